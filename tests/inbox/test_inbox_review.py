"""The upload inbox's review fixes (issue 19): a ZIP is read through one open ZipFile however
many entries it holds; an accepted study names the local referrer, not the outside
hospital's, so a local namesake of the outside referrer gains nothing; two uploads of one
Study Instance UID (two patients, or a hostile file) never merge into one waiting entry."""

from __future__ import annotations

import io
import os
import sys
from typing import Any

import pydicom
from flask import Flask
from flask.testing import FlaskClient
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import link_identifier
from portal.access.models import Grant
from portal.archive import current_archive
from portal.inbox.models import InboxStudy
from portal.index.models import Instance, Patient, Series, Study, StudyReferrer
from tests.conftest import IdentityProvider, add_person, csrf_of, signed_in
from tests.inbox.conftest import (
    ADMIN,
    LOCAL_ID,
    Inbox,
    make_upload_link,
    open_link,
    outside_instance,
    upload,
    zip_of,
)

# Files opened by this process while ``_OPENS["watch"]`` names a folder (an audit hook: it
# observes the real open calls; hooks cannot be removed, so it stays idle between tests).
_OPENS: dict[str, Any] = {"watch": None, "paths": []}


def _count_opens(event: str, args: tuple[Any, ...]) -> None:
    watch = _OPENS["watch"]
    if watch is None or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.fsdecode(args[0])
    if path.startswith(watch):
        _OPENS["paths"].append(path)


sys.addaudithook(_count_opens)


def _link_client(app: Flask, inbox: Inbox, for_whom: str = "Anna Müller") -> FlaskClient:
    made = make_upload_link(app, inbox.doctor, for_whom=for_whom)
    client = app.test_client()
    assert open_link(client, made.token, made.pin).status_code == 303
    return client


def _waiting(app: Flask) -> list[InboxStudy]:
    with app.extensions["db"].new_session() as session:
        rows = list(session.scalars(select(InboxStudy).where(InboxStudy.state == "waiting")
                                    .order_by(InboxStudy.id)))
        for row in rows:
            _ = row.instances
        return rows


def _local_patient(app: Flask) -> int:
    with app.extensions["db"].new_session() as session:
        return int(session.scalars(select(Patient.id).where(
            Patient.patient_id == LOCAL_ID)).one())


def test_a_zip_is_read_through_one_open_file_however_many_entries(inbox: Inbox) -> None:
    """The old reader reopened the ZIP (parsing its whole central directory) for every entry:
    400 entries opened the part file 400 times and more; now a fixed few."""
    app = inbox.app
    client = _link_client(app, inbox)
    study, series = generate_uid(), generate_uid()
    entries = {f"DICOM/IM{n:04d}": outside_instance(study=study, series=series,
                                                    InstanceNumber=n, value=n)
               for n in range(1, 401)}
    parts = str(app.extensions["inbox"].root / "parts")
    _OPENS["watch"], _OPENS["paths"] = parts, []
    try:
        answer = upload(client, "cd.zip", zip_of(entries), chunk=1 << 20)
    finally:
        _OPENS["watch"] = None
    assert [r["outcome"] for r in answer["results"]] == ["kept"] * 400
    assert [r["name"] for r in answer["results"]] == sorted(entries)  # in the ZIP's order
    # Appending the one chunk, the lock, the magic bytes, the whole-ZIP check, the stream.
    assert 1 <= len(_OPENS["paths"]) <= 6, len(_OPENS["paths"])
    [waiting] = _waiting(app)
    assert len(waiting.instances) == 400


def _outside_with_codes(study: str, **extra: Any) -> bytes:
    """An outside file naming its referrer by name and by an NPI code."""
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "1234567893", "NPI", "NPI"
    person = Dataset()
    person.PersonIdentificationCodeSequence = Sequence([code])
    return outside_instance(study=study,
                            ReferringPhysicianIdentificationSequence=Sequence([person]),
                            **extra)


def test_an_accepted_study_names_the_local_referrer_not_the_outside_one(
        any_db_inbox: Inbox, idp: IdentityProvider) -> None:
    """A local physician whose name (and NPI) equal the outside hospital's referrer does not
    see the accepted study; the physician who uploaded it does, by the referral rule.
    SQLite and PostgreSQL."""
    inbox = any_db_inbox
    app = inbox.app
    namesake = add_person(app, idp, "namesake", ["physician"], "Elsewhere",
                          name="Dr Outside")
    plain = add_person(app, idp, "plain", ["physician"], "Clinic", name="Dr Plain")
    with app.test_request_context(), app.extensions["db"].write_transaction() as session:
        link_identifier(session, ADMIN, namesake, "name:Outside^Doctor")
        link_identifier(session, ADMIN, namesake, "npi:1234567893")
        link_identifier(session, ADMIN, inbox.doctor, "name:House^Gregory")
    doctor = signed_in(app, idp, "doc")
    first = generate_uid()
    upload(doctor, "IM1", _outside_with_codes(first),
           headers={"X-CSRF-Token": csrf_of(doctor)})
    [waiting] = _waiting(app)
    manager = signed_in(app, idp, "om")
    page = manager.get(f"/inbox/studies/{waiting.public_id}").data.decode()
    # The uploader is the referrer the form offers first.
    referrer_select = page.split('name="referrer"')[1].split("</select>")[0]
    assert f'value="{inbox.doctor}" selected' in referrer_select
    token = csrf_of(manager)
    assert manager.post(f"/inbox/studies/{waiting.public_id}/accept",
                        data={"csrf_token": token, "patient": _local_patient(app),
                              "referrer": inbox.doctor}).status_code == 303
    with app.extensions["db"].new_session() as session:
        row = session.scalars(select(Study).where(Study.study_instance_uid == first)).one()
        assert row.referring_physician_name == "HOUSE^GREGORY"
        assert set(session.scalars(select(StudyReferrer.key).where(
            StudyReferrer.study_fk == row.id))) == {"name:HOUSE^GREGORY"}
        sop = session.scalars(select(Instance.sop_instance_uid).join(Series).where(
            Series.study_fk == row.id)).one()
        # He sees it as its referrer, not by a grant.
        assert session.scalar(select(Grant.id).where(
            Grant.study_instance_uid == first)) is None
    with app.app_context():
        ds = pydicom.dcmread(io.BytesIO(current_archive().read(sop)))
    assert str(ds.ReferringPhysicianName) == "HOUSE^GREGORY"
    assert "ReferringPhysicianIdentificationSequence" not in ds
    [original] = ds.OriginalAttributesSequence[-1].ModifiedAttributesSequence
    assert str(original.ReferringPhysicianName) == "Outside^Doctor"
    [kept] = original.ReferringPhysicianIdentificationSequence
    assert kept.PersonIdentificationCodeSequence[0].CodeValue == "1234567893"
    assert doctor.get(f"/studies/{first}").status_code == 200
    assert signed_in(app, idp, "namesake").get(f"/studies/{first}").status_code == 404

    # A patient's upload: the office manager names a physician without a linked name; the
    # files name nobody, he is given the study, the namesake still sees nothing.
    patient = _link_client(app, inbox)
    second = generate_uid()
    upload(patient, "IM1", _outside_with_codes(second))
    [waiting] = _waiting(app)
    page = manager.get(f"/inbox/studies/{waiting.public_id}").data.decode()
    assert "selected" not in page.split('name="referrer"')[1].split("</select>")[0]
    assert manager.post(f"/inbox/studies/{waiting.public_id}/accept",
                        data={"csrf_token": token, "patient": _local_patient(app),
                              "referrer": plain}).status_code == 303
    with app.extensions["db"].new_session() as session:
        row = session.scalars(select(Study).where(Study.study_instance_uid == second)).one()
        assert row.referring_physician_name == ""
        assert list(session.scalars(select(StudyReferrer.key).where(
            StudyReferrer.study_fk == row.id))) == []
    assert signed_in(app, idp, "plain").get(f"/studies/{second}").status_code == 200
    assert signed_in(app, idp, "namesake").get(f"/studies/{second}").status_code == 404
    # A referrer who is not a physician of the practice is refused, nothing accepted.
    patient2 = _link_client(app, inbox)
    upload(patient2, "IM1", _outside_with_codes(generate_uid()))
    [waiting] = _waiting(app)
    refused = manager.post(f"/inbox/studies/{waiting.public_id}/accept",
                           data={"csrf_token": token, "patient": _local_patient(app),
                                 "referrer": namesake})
    assert refused.status_code == 400
    assert len(_waiting(app)) == 1


def test_two_uploads_of_one_study_uid_never_merge(any_db_inbox: Inbox,
                                                  idp: IdentityProvider) -> None:
    """Two patients' links send files of one Study Instance UID (by chance or on purpose):
    two waiting entries, each with its own patient; a file of another patient under a study
    its own link already sent is refused in plain words; accepting one entry takes only its
    patient's files, and the other cannot join that study under another patient. SQLite
    and PostgreSQL."""
    inbox = any_db_inbox
    app = inbox.app
    anna, sam = _link_client(app, inbox), _link_client(app, inbox, for_whom="Sam Stranger")
    shared = generate_uid()
    upload(anna, "IM1", outside_instance(study=shared, InstanceNumber=1))
    hostile = dict(study=shared, patient_id="NOBODY-1", name="Stranger^Sam",
                   birth="19990101")
    upload(sam, "IM1", outside_instance(**hostile))
    # Anna's link: the same patient written otherwise joins her entry; another patient under
    # her study's UID is refused, nothing kept of it.
    same = upload(anna, "IM2", outside_instance(study=shared, name="Mueller^Anna",
                                                InstanceNumber=2))
    assert same["results"][0]["outcome"] == "kept"
    other = upload(anna, "IM3", outside_instance(**hostile))["results"][0]
    assert other["outcome"] == "refused" and "another patient" in other["reason"]
    waiting = _waiting(app)
    assert [(w.study_instance_uid, w.patient_id, len(w.instances)) for w in waiting] == [
        (shared, "EXT-991", 2), (shared, "NOBODY-1", 1)]
    # A signed-in physician's upload of the same UID is his own entry too.
    doctor = signed_in(app, idp, "doc")
    upload(doctor, "IM1", outside_instance(study=shared, InstanceNumber=9),
           headers={"X-CSRF-Token": csrf_of(doctor)})
    assert len(_waiting(app)) == 3
    manager = signed_in(app, idp, "om")
    listing = manager.get("/inbox").data.decode()
    assert listing.count('class="inbox-item"') == 3 and "Stranger" in listing
    token = csrf_of(manager)
    annas, sams = waiting
    assert manager.post(f"/inbox/studies/{annas.public_id}/accept",
                        data={"csrf_token": token, "patient": _local_patient(app),
                              "referrer": ""}).status_code == 303
    with app.extensions["db"].new_session() as session:
        row = session.scalars(select(Study).where(Study.study_instance_uid == shared)).one()
        assert row.patient.patient_id == LOCAL_ID and row.number_of_instances == 2
    # Sam's file cannot join that study under another patient: refused, it stays waiting.
    assert manager.post(f"/inbox/studies/{sams.public_id}/accept",
                        data={"csrf_token": token, "patient": "new",
                              "new_patient_id": "LOCAL-SAM"}).status_code == 303
    left = {w.public_id: len(w.instances) for w in _waiting(app)}
    assert left.get(sams.public_id) == 1
    with app.extensions["db"].new_session() as session:
        row = session.scalars(select(Study).where(Study.study_instance_uid == shared)).one()
        assert row.patient.patient_id == LOCAL_ID and row.number_of_instances == 2
