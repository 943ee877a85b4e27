"""What probes from outside found (an attacker's requests and real clients, fourteenth
session): each is a request a careless or hostile client sends, and the answer it must get.

- a grant of a study another practice sees, and a manager moving himself or another
  practice's people (docs/security.md 11);
- bodies gunicorn finds malformed, a lone surrogate in JSON, frames of a report, a number
  past the index's columns and ``nan`` coordinates: 4xx or stored, never a 5xx.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
from pathlib import Path

import pydicom
from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from portal.access.models import AuditEvent, Grant, User
from portal.archive import current_archive
from tests.access.test_console import referrer_of_practice, setup
from tests.conftest import (
    IdentityProvider,
    add_person,
    basic_auth,
    csrf_of,
    make_client,
    signed_in,
)
from tests.factories import make_dataset, make_instance, to_bytes
from tests.reports.test_sources import sr_document
from tests.support.gunicorn import served

BOUNDARY = "probe-boundary"


def _other_practices_study(app: Flask, idp: IdentityProvider) -> str:
    """A study that only "Elsewhere" sees (its physician referred it)."""
    name = f"Else^Where{generate_uid()[-6:]}"
    referrer_of_practice(app, "Elsewhere", name)
    study = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=study, ReferringPhysicianName=name,
                                               patient_id=f"ELSE-{study[-6:]}"), who="test")
    return study


def _manager_of(app: Flask) -> tuple[int, str]:
    """The id and subject of the office manager ``setup`` made last."""
    with app.extensions["db"].new_session() as session:
        return next((user.id, user.subject) for user in session.scalars(
            select(User).where(User.subject.like("om-%")).order_by(User.id.desc())))


def _grants(app: Flask) -> int:
    with app.extensions["db"].new_session() as session:
        return session.scalar(select(func.count()).select_from(Grant)) or 0


def test_a_single_grant_stays_within_the_practice_unless_it_is_emergency_access(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    manager, doctor, ours = setup(oidc_app, idp)
    theirs = _other_practices_study(oidc_app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    me, _subject = _manager_of(oidc_app)
    for body in ({"user_id": me, "study_uid": theirs},
                 {"user_id": doctor, "patient_id": f"ELSE-{theirs[-6:]}"}):
        refused = manager.post("/api/grants", json=body, headers=headers)
        assert refused.status_code == 400, refused.data
        assert "not one your practice may see" in refused.get_json()["error"]
    form = manager.post("/admin/grants", follow_redirects=True, data={
        "csrf_token": csrf_of(manager), "user_id": str(me), "study_uid": theirs})
    assert "not one your practice may see" in form.get_data(as_text=True)
    assert _grants(oidc_app) == 0
    # The manager still sees nothing of it, and his own practice's study can be granted.
    assert manager.get(f"/dicomweb/studies/{theirs}/metadata").status_code == 404
    assert manager.post("/api/grants", json={"user_id": doctor, "study_uid": ours},
                        headers=headers).status_code == 201
    # Emergency access is the audited way past the practice (110127).
    opened = manager.post("/api/grants", headers=headers, json={
        "user_id": doctor, "study_uid": theirs, "break_glass": True,
        "reason": "patient in the emergency room now"})
    assert opened.status_code == 201, opened.data
    with oidc_app.extensions["db"].new_session() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.event_id == "110127", AuditEvent.study_instance_uid == theirs)) == 1


def test_a_manager_revokes_only_his_practices_grants_and_his_own(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    """Grant ids are small numbers: a manager naming another practice's grant (alone, among
    his own, or through "take everything away") changes nothing of it; what he gave past the
    practice himself (emergency access) he can take back. Another practice's people are
    unknown to him: he gives them nothing and takes nothing from them."""
    from portal.db import utcnow

    manager, _doctor, ours = setup(oidc_app, idp)
    theirs = _other_practices_study(oidc_app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    tag = generate_uid()[-6:]
    # A visiting physician of no practice, given the other practice's study there and ours
    # here; and a physician of the other practice.
    doctor = add_person(oidc_app, idp, f"visitor-{tag}", ["physician"])
    outsider = add_person(oidc_app, idp, f"else-{tag}", ["physician"], "Elsewhere")
    for refused in (manager.post("/api/grants", headers=headers, json={
            "user_id": outsider, "study_uid": ours}),
            manager.post(f"/api/users/{outsider}/grants/revoke", headers=headers)):
        assert refused.status_code == 400 and "no such user" in refused.get_json()["error"]
    with oidc_app.extensions["db"].write_transaction() as session:
        foreign = Grant(user_fk=doctor, study_instance_uid=theirs, reason="their referral",
                        granted_by="user:elsewhere|manager", created_at=utcnow())
        session.add(foreign)
        session.flush()
        foreign_id = foreign.id
    own = manager.post("/api/grants", headers=headers, json={"user_id": doctor,
                                                              "study_uid": ours})
    assert own.status_code == 201, own.data
    own_id = own.get_json()["id"]

    def live() -> set[int]:
        with oidc_app.extensions["db"].new_session() as session:
            return {g.id for g in session.scalars(select(Grant).where(
                Grant.user_fk == doctor, Grant.revoked_at.is_(None)))}

    for ids in ([foreign_id], [own_id, foreign_id]):
        refused = manager.post("/api/grants/revoke", headers=headers, json={"ids": ids})
        assert refused.status_code == 403 and "unknown grant" in refused.get_json()["error"]
    form = manager.post(f"/admin/grants/{foreign_id}/revoke", follow_redirects=True,
                        data={"csrf_token": csrf_of(manager)})
    assert "unknown grant" in form.get_data(as_text=True)
    bulk = manager.post("/admin/grants/revoke", follow_redirects=True, data={
        "csrf_token": csrf_of(manager), "grant": [str(own_id), str(foreign_id)]})
    assert "unknown grant" in bulk.get_data(as_text=True)
    assert live() == {own_id, foreign_id}
    listed = {g["id"] for g in manager.get("/api/grants").get_json()}
    assert own_id in listed and foreign_id not in listed
    # "Take everything away" lists and takes what the practice gave, not the other's.
    confirm = manager.get(f"/admin/people/{doctor}/take-away").get_data(as_text=True)
    assert theirs not in confirm and "their referral" not in confirm
    taken = manager.post(f"/api/users/{doctor}/grants/revoke", headers=headers)
    assert taken.get_json()["revoked"] == [own_id]
    assert live() == {foreign_id}
    # Emergency access he gave past the practice is his to end.
    opened = manager.post("/api/grants", headers=headers, json={
        "user_id": doctor, "study_uid": theirs, "break_glass": True,
        "reason": "patient in the emergency room now"})
    assert opened.status_code == 201, opened.data
    ended = manager.post("/api/grants/revoke", headers=headers,
                         json={"ids": [opened.get_json()["id"]]})
    assert ended.status_code == 200 and ended.get_json() == {"revoked": 1}
    assert live() == {foreign_id}


def test_a_practices_manager_reads_only_his_practices_people_and_records(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    """An installation shared by practices: a manager's people list and search, person
    pages, audit trail (page, CSV, API) and front-page counts hold his practice's part and
    the people of no practice, not the other practice's people or records (docs/security.md
    11)."""
    from portal import audit

    manager, doctor, ours = setup(oidc_app, idp)
    theirs = _other_practices_study(oidc_app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    tag = generate_uid()[-6:]
    outsider = add_person(oidc_app, idp, f"else-{tag}", ["physician"], "Elsewhere",
                          name=f"Otto Outsider{tag}")
    loner = add_person(oidc_app, idp, f"none-{tag}", ["physician"], name=f"Nora Loner{tag}")
    database = oidc_app.extensions["db"]
    counts = manager.get("/api/attention").get_json()
    for study in (theirs, ours):
        audit.record(database, audit.INSTANCES_ACCESSED, action="R",
                     outcome=audit.OUTCOME_SUCCESS, who=f"user:{idp.issuer}|else-{tag}",
                     study_instance_uid=study, details={"what": "study"})
        audit.record(database, audit.SECURITY_ALERT, action="E",
                     outcome=audit.OUTCOME_MINOR_FAILURE, who="archive:test",
                     study_instance_uid=study, details={"reason": f"probe {tag}"})
    audit.record(database, audit.USER_AUTHENTICATION, action="E",
                 outcome=audit.OUTCOME_SUCCESS, who=f"user:{idp.issuer}|else-{tag}",
                 details={"probe": tag})
    # People: his practice's and those of no practice, nobody of the other practice.
    listed = manager.get("/admin/users").get_data(as_text=True)
    assert f"none-{tag}@demo.example" in listed and f"else-{tag}@demo.example" not in listed
    ids = {u["id"] for u in manager.get("/api/users").get_json()}
    assert {doctor, loner} <= ids and outsider not in ids
    assert manager.get(f"/api/search/people?q=Otto%20Outsider{tag}").get_json() == []
    assert [p["id"] for p in manager.get(
        f"/api/search/people?q=Nora%20Loner{tag}").get_json()] == [loner]
    assert f"else-{tag}@" not in manager.get(f"/admin/?q=Outsider{tag}").get_data(as_text=True)
    assert manager.get(f"/admin/people/{outsider}").status_code == 404
    assert manager.get(f"/admin/people/{loner}").status_code == 200
    # Records: about his practice's studies, and what his people did; not the other's.
    assert manager.get(f"/api/audit?study={theirs}").get_json() == []
    # The outsider's read of our study, not his read of theirs nor his sign-in.
    assert {r["study_uid"] for r in manager.get(
        f"/api/audit?who=else-{tag}&limit=1000").get_json()} == {ours}
    assert theirs not in manager.get("/admin/audit.csv?event=110113").get_data(as_text=True)
    assert "No records match." in manager.get(f"/admin/audit?study={theirs}").get_data(
        as_text=True)
    after = manager.get("/api/attention").get_json()
    assert after["security_alerts"] == counts["security_alerts"] + 1  # ours alone
    # What his own people did is his to read, also where no study of his is named.
    colleague = _subject_of(oidc_app, doctor)
    audit.record(database, audit.USER_AUTHENTICATION, action="E",
                 outcome=audit.OUTCOME_SUCCESS, who=f"user:{idp.issuer}|{colleague}",
                 details={"probe": tag})
    assert [r["details"] for r in manager.get(
        f"/api/audit?event=110114&who={colleague}").get_json()] == [{"probe": tag}]
    # The installation's manager (of no practice) reads and lists everything.
    installation = f"om-none-{tag}"
    add_person(oidc_app, idp, installation, ["office_manager"])
    whole = signed_in(oidc_app, idp, installation)
    assert {r["study_uid"] for r in whole.get(
        f"/api/audit?who=else-{tag}&limit=1000").get_json()} == {ours, theirs, ""}
    assert outsider in {u["id"] for u in whole.get("/api/users").get_json()}
    # A practice's manager changes neither the installation's manager nor, through a
    # patient account, another practice's patient.
    me_none = _user_id(oidc_app, installation)
    demoted = manager.patch(f"/api/users/{me_none}", headers=headers,
                            json={"roles": ["physician"], "active": False})
    assert demoted.status_code == 400 and "installation" in demoted.get_json()["error"]
    form = manager.post(f"/admin/users/{loner}", follow_redirects=True, data={
        "csrf_token": csrf_of(manager), "role_patient": "on",
        "patient_id": f"ELSE-{theirs[-6:]}", "active": "on"})
    assert "not one your practice may see" in form.get_data(as_text=True)
    # The other practice's referrer identifiers are neither listed nor removed nor added to.
    from portal.access.models import Practice, ReferrerIdentifier

    with database.new_session() as session:
        theirs_key = session.scalars(select(ReferrerIdentifier).join(
            User, User.id == ReferrerIdentifier.user_fk).join(
            Practice, Practice.id == User.practice_fk).where(
            Practice.name == "Elsewhere")).first()
        assert theirs_key is not None
        key_id, key = theirs_key.id, theirs_key.key
    assert key_id not in {i["id"] for i in manager.get("/api/identifiers").get_json()["linked"]}
    assert key not in manager.get("/admin/identifiers").get_data(as_text=True)
    gone = manager.delete(f"/api/identifiers/{key_id}", headers=headers)
    assert gone.status_code == 400 and "no such identifier" in gone.get_json()["error"]
    added = manager.post("/api/identifiers", headers=headers,
                         json={"user_id": outsider, "key": f"Else^Key{tag}"})
    assert added.status_code == 400 and "no such user" in added.get_json()["error"]
    # Nor does /admin/give?user=<id> name another practice's person.
    assert f"else-{tag}@" not in manager.get(f"/admin/give?user={outsider}").get_data(
        as_text=True)


def test_a_patients_grant_from_a_practice_covers_only_that_practices_studies(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    """One patient, one study referred by each of two practices: "every study of the
    patient" given by the first practice's manager opens its study, not the other's; the
    same grant by the installation's manager (of no practice) opens both."""
    manager, doctor, _ours = setup(oidc_app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    tag = generate_uid()[-6:]
    patient_id = f"BOTH-{tag}"
    studies = {}
    for practice in ("Clinic", "Elsewhere"):
        name = f"Both^{practice}{tag}"
        referrer_of_practice(oidc_app, practice, name)
        studies[practice] = generate_uid()
        with oidc_app.app_context():
            current_archive().ingest(make_instance(
                study=studies[practice], patient_id=patient_id, patient_name="Both^Bea",
                ReferringPhysicianName=name), who="test")
    client = signed_in(oidc_app, idp, _subject_of(oidc_app, doctor))

    def sees(practice: str) -> bool:
        answer = client.get(f"/dicomweb/studies/{studies[practice]}/metadata")
        assert answer.status_code in (200, 404), answer.status_code
        return answer.status_code == 200

    assert not sees("Clinic") and not sees("Elsewhere")
    given = manager.post("/api/grants", headers=headers,
                         json={"user_id": doctor, "patient_id": patient_id})
    assert given.status_code == 201, given.data
    assert sees("Clinic") and not sees("Elsewhere")
    installation = f"om-none-{tag}"
    add_person(oidc_app, idp, installation, ["office_manager"])
    whole = signed_in(oidc_app, idp, installation)
    assert whole.post("/api/grants", headers={"X-CSRF-Token": csrf_of(whole)}, json={
        "user_id": doctor, "patient_id": patient_id}).status_code == 201
    assert sees("Clinic") and sees("Elsewhere")


def _user_id(app: Flask, subject: str) -> int:
    with app.extensions["db"].new_session() as session:
        return int(session.scalars(select(User.id).where(User.subject == subject)).one())


def _subject_of(app: Flask, user_id: int) -> str:
    with app.extensions["db"].new_session() as session:
        return str(session.get(User, user_id).subject)


def test_a_manager_changes_only_his_practices_people_and_never_moves_himself(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    manager, doctor, _study = setup(oidc_app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    me, _subject = _manager_of(oidc_app)
    outsider = add_person(oidc_app, idp, f"else-{generate_uid()[-6:]}", ["physician"],
                          "Elsewhere")
    newcomer = add_person(oidc_app, idp, f"new-{generate_uid()[-6:]}", ["physician"])
    moved = manager.patch(f"/api/users/{me}", json={"practice": "Elsewhere"}, headers=headers)
    assert moved.status_code == 400 and "your own practice" in moved.get_json()["error"]
    out = manager.patch(f"/api/users/{me}", json={"practice": ""}, headers=headers)
    assert out.status_code == 400 and "yourself" in out.get_json()["error"]
    into = manager.patch(f"/api/users/{doctor}", json={"practice": "Elsewhere"},
                         headers=headers)
    assert into.status_code == 400 and "your own practice" in into.get_json()["error"]
    theirs = manager.patch(f"/api/users/{outsider}", json={"practice": "Clinic"},
                           headers=headers)
    assert theirs.status_code == 400 and "another practice" in theirs.get_json()["error"]
    assert manager.patch(f"/api/users/{outsider}", json={"roles": ["office_manager"]},
                         headers=headers).status_code == 400
    invited = manager.post("/api/invitations", headers=headers, json={
        "email": "x@demo.example", "roles": ["physician"], "practice": "Elsewhere"})
    assert invited.status_code == 400
    with oidc_app.extensions["db"].new_session() as session:
        practices = dict(session.execute(select(User.id, User.practice_fk).where(
            User.id.in_([me, doctor, outsider]))).all())
        assert practices[me] == practices[doctor] != practices[outsider]
        assert session.get(User, outsider).roles == ["physician"]
    # Someone of no practice joins his: what a manager is for.
    joined = manager.patch(f"/api/users/{newcomer}", json={"practice": "Clinic"},
                           headers=headers)
    assert joined.status_code == 200, joined.data


def test_a_manager_cannot_make_a_manager_of_no_practice_to_act_for_him(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    """A manager of no practice is the installation's: a practice's manager cannot make one
    (his second account, an accomplice) to move him or grant past the practice."""
    manager, _doctor, _study = setup(oidc_app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager)}
    helper = add_person(oidc_app, idp, f"alt-{generate_uid()[-6:]}", ["physician"])
    made = manager.patch(f"/api/users/{helper}", json={"roles": ["office_manager"]},
                         headers=headers)
    assert made.status_code == 400 and "belong to your practice" in made.get_json()["error"]
    out = manager.patch(f"/api/users/{helper}", headers=headers,
                        json={"roles": ["office_manager"], "practice": ""})
    assert out.status_code == 400
    invited = manager.post("/api/invitations", headers=headers, json={
        "email": "alt@demo.example", "roles": ["office_manager"], "practice": ""})
    assert invited.status_code == 400
    with oidc_app.extensions["db"].new_session() as session:
        assert session.get(User, helper).roles == ["physician"]
    # Made within the practice, a co-manager is fine.
    joined = manager.patch(f"/api/users/{helper}", headers=headers,
                           json={"roles": ["office_manager"], "practice": "Clinic"})
    assert joined.status_code == 200, joined.data


def test_the_installations_manager_of_no_practice_still_grants_any_study(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    """The first manager, made with ``flask users grant-role`` (no practice), grants as
    the command line does, and may join a practice himself."""
    _manager, doctor, ours = setup(oidc_app, idp)
    theirs = _other_practices_study(oidc_app, idp)
    subject = f"first-{generate_uid()[-6:]}"
    first = add_person(oidc_app, idp, subject, ["office_manager"])
    installation = signed_in(oidc_app, idp, subject)
    headers = {"X-CSRF-Token": csrf_of(installation)}
    for study in (ours, theirs):
        made = installation.post("/api/grants", headers=headers,
                                 json={"user_id": doctor, "study_uid": study})
        assert made.status_code == 201, made.data
    assert installation.patch(f"/api/users/{first}", headers=headers,
                              json={"practice": "Clinic"}).status_code == 200


def test_a_lone_surrogate_in_json_is_a_bad_request(oidc_app: Flask,
                                                  idp: IdentityProvider) -> None:
    manager, doctor, study = setup(oidc_app, idp)
    headers = {"X-CSRF-Token": csrf_of(manager), "Content-Type": "application/json"}
    for path, body in (("/api/grants", f'{{"user_id": {doctor}, "study_uid": "{study}", '
                                       '"reason": "\\ud800"}'),
                       (f"/api/users/{doctor}", '{"practice": "Cl\\udfffinic"}')):
        method = manager.patch if "users" in path else manager.post
        answer = method(path, data=body, headers=headers)
        assert answer.status_code == 400, (path, answer.status_code, answer.data)
    assert _grants(oidc_app) == 0


def test_frames_of_a_report_are_not_found(app: Flask, client: FlaskClient) -> None:
    auth = basic_auth(*make_client(app, "reader"))
    study = generate_uid()
    report = sr_document(study, "ACC-1")
    with app.app_context():
        current_archive().ingest(report, who="test")
    ds = pydicom.dcmread(io.BytesIO(report))
    path = (f"/dicomweb/studies/{study}/series/{ds.SeriesInstanceUID}/instances/"
            f"{ds.SOPInstanceUID}/frames/1")
    for accept in ("", 'multipart/related; type="application/octet-stream"; '
                       "transfer-syntax=*"):
        answer = client.get(path, headers={**auth, "Accept": accept})
        assert answer.status_code == 404, (accept, answer.status_code, answer.data)
        assert "no image" in answer.get_json()["error"]


def test_a_number_past_the_index_and_nan_coordinates_are_stored_and_read_as_json(
        app: Flask, client: FlaskClient) -> None:
    auth = basic_auth(*make_client(app, "store-read"))
    study, series = generate_uid(), generate_uid()
    odd = make_dataset(study=study, series=series, InstanceNumber="99999999999999999999",
                       ImagePositionPatient=["nan", "inf", "-inf"], SliceThickness="1e999")
    plain = [make_dataset(study=study, series=series, InstanceNumber=n) for n in (1, 2)]
    parts = b"".join(b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                     + to_bytes(ds) + b"\r\n" for ds in (plain[0], odd, plain[1]))
    stored = client.post("/dicomweb/studies", data=parts + f"--{BOUNDARY}--".encode(),
                         headers={**auth, "Accept": "application/dicom+json",
                                  "Content-Type": 'multipart/related; type="application/'
                                                  f'dicom"; boundary={BOUNDARY}'})
    assert stored.status_code == 200, stored.data
    assert len(stored.get_json()["00081199"]["Value"]) == 3

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(
            ValueError(f"{c} is not JSON")))

    for path in (f"/dicomweb/studies/{study}/series/{series}/metadata",
                 f"/dicomweb/studies/{study}/instances?includefield=all"):
        answer = client.get(path, headers={**auth, "Accept": "application/dicom+json"})
        assert answer.status_code == 200, path
        found = strict(answer.get_data(as_text=True))
        assert isinstance(found, list) and len(found) == 3
    metadata = strict(client.get(
        f"/dicomweb/studies/{study}/series/{series}/instances/{odd.SOPInstanceUID}/metadata",
        headers={**auth, "Accept": "application/dicom+json"}).get_data(as_text=True))
    assert isinstance(metadata, list)
    assert metadata[0]["00200032"]["Value"] == [None, None, None]


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_bodies_gunicorn_finds_malformed_are_a_bad_request(tmp_path: Path) -> None:
    with served(tmp_path / "instance", "stower") as server:
        auth = basic_auth(server.client, server.secret)["Authorization"]
        form = (b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/"
                b"x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\nConnection: close"
                b"\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
        assert _raw(server.port, form).startswith(b"HTTP/1.1 400"), _raw(server.port, form)
        for body in (b"zz\r\nabc\r\n0\r\n\r\n", b"10000\r\nonly a little"):
            stow = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: {auth}\r\nContent-Type: multipart/related; "
                    f'type="application/dicom"; boundary={BOUNDARY}\r\n'
                    f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
            answer = _raw(server.port, stow + body)
            assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 200  # the server is fine afterwards
        connection.close()


def test_another_practices_study_cannot_be_reached_through_a_signed_in_grant(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    """The attack end to end: the manager grants himself, then reads. Nothing to read."""
    manager, _doctor, _study = setup(oidc_app, idp)
    theirs = _other_practices_study(oidc_app, idp)
    me, _subject = _manager_of(oidc_app)
    manager.post("/api/grants", json={"user_id": me, "study_uid": theirs},
                 headers={"X-CSRF-Token": csrf_of(manager)})
    again = signed_in(oidc_app, idp, _manager_of(oidc_app)[1])
    assert again.get(f"/dicomweb/studies/{theirs}/metadata").status_code == 404


def test_gunicorn_leaves_forwarding_headers_to_the_portals_proxy_settings(
        tmp_path: Path) -> None:
    """Without PORTAL_TRUSTED_PROXIES no one is a proxy: a process on the machine that says
    ``X-Forwarded-Proto: https`` (gunicorn believed it from 127.0.0.1 by default) is not taken
    to have come over TLS, so the answer carries no HSTS and no absolute URL turns https."""
    with served(tmp_path / "instance", "prober") as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for name, value in (("X-Forwarded-Proto", "https"), ("X-Forwarded-Ssl", "on"),
                            ("X-Forwarded-Protocol", "ssl")):
            connection.request("GET", "/healthz", headers={name: value})
            answer = connection.getresponse()
            answer.read()
            assert answer.status == 200
            assert answer.getheader("Strict-Transport-Security") is None, name
        connection.close()


def test_thousands_of_tiny_parts_make_a_bounded_audit_trail(app: Flask,
                                                            client: FlaskClient) -> None:
    """A store-only client sends 2,000 one-byte parts: each is refused in the answer, the
    first 100 make a record each and one more counts the rest (docs/security.md 40)."""
    name, secret = make_client(app, "tiny-parts")
    parts = b"".join(b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                     + bytes([n % 256]) + b"\r\n" for n in range(2000))
    answer = client.post("/dicomweb/studies", data=parts + f"--{BOUNDARY}--".encode(),
                         headers={**basic_auth(name, secret), "Accept": "application/dicom+json",
                                  "Content-Type": 'multipart/related; type="application/'
                                                  f'dicom"; boundary={BOUNDARY}'})
    assert answer.status_code in (400, 409), answer.status_code
    assert len(answer.get_json()["00081198"]["Value"]) == 2000
    with app.extensions["db"].new_session() as session:
        records = session.scalars(select(AuditEvent).where(
            AuditEvent.event_id == "110107", AuditEvent.who.like("%tiny-parts%"))).all()
    assert len(records) == 101, len(records)
    summary = [r for r in records if "more refused files" in r.details["reason"]]
    assert len(summary) == 1
    assert summary[0].details["files"] == 1900 and summary[0].details["size"] == 1900
