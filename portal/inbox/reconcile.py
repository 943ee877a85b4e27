"""Reconciliation of quarantined studies (IHE Import Reconciliation Workflow).

An office manager sees the waiting studies of his practice, with local patients suggested
by identifier, birth date and name (best first). Accepting one replaces Patient ID, issuer,
name, birth date, sex and Accession Number with the local values, and the outside hospital's
referring physician (name and identification codes) with the local referrer chosen, keeps the
originals (PS3.3 C.12.1: Other Patient IDs Sequence (0010,1002) and Original Attributes
Sequence (0400,0561) with reason COERCE), and sends every file through the archive's normal
ingest (validated again, indexed, after-ingest steps, 110104). Rejecting deletes the files;
both are audited. Until then no access rule sees the study: it is not in the index.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import CursorResult, Select, delete, func, or_, select, update
from sqlalchemy.orm import Session

from portal import audit, failures
from portal.access.grants import create_grant
from portal.access.models import ReferrerIdentifier, User
from portal.access.policy import study_filter
from portal.access.principal import Principal, user_principal
from portal.archive.after import Stored
from portal.archive.ingest import Archive
from portal.archive.validate import Rejected
from portal.db import Database, utcnow
from portal.inbox.models import InboxInstance, InboxStudy
from portal.inbox.quarantine import Quarantine
from portal.index.models import Patient, Study
from portal.index.names import name_search_text, search_words
from portal.index.referrers import name_key

log = logging.getLogger(__name__)

STUDY_DELETED = ("110105", "DICOM Study Deleted")
MODIFYING_SYSTEM = "REFERRER PORTAL INBOX"
ACCEPT_BATCH = 32  # files coerced and ingested at a time (the ingest's own batch size)
# A study of more files than this is accepted by a background job (``inbox-accept``,
# portal/jobs.py) whose progress its page shows; smaller ones within the request.
ACCEPT_INLINE_MAX = 64


class ReconcileError(failures.Invalid):
    """The study cannot be accepted or rejected as asked (400); the message says why."""


class NoSuchInboxStudy(failures.NotFound):
    """Not a waiting study of this practice's inbox: another practice's and a missing one
    answer alike (404, docs/security.md 16)."""

    default_reason = "no such study in your inbox"


class AcceptRunning(failures.Conflict):
    """A second accept (or a reject) of a study being accepted now (409)."""

    default_reason = "this study is being accepted now; its page shows how far it is"


class AlreadyHandled(failures.Conflict):
    """Another request accepted or rejected the study meanwhile (409)."""

    default_reason = "this study is already being handled: open the inbox again"


@dataclass(frozen=True)
class Suggestion:
    """A local patient that may be the uploaded one, and why."""

    patient: Patient
    score: int
    why: tuple[str, ...]


@dataclass(frozen=True)
class LocalIdentity:
    """Who the study becomes: a patient of the practice, or a new one with a local ID."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str

    @classmethod
    def of(cls, patient: Patient) -> LocalIdentity:
        """The identity of a patient in the index."""
        return cls(patient.patient_id, patient.issuer_of_patient_id, patient.patient_name,
                   patient.patient_birth_date, patient.patient_sex)


_LOCAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$")


def new_local_patient(session: Session, actor: Principal, study: InboxStudy,
                      patient_id: str) -> LocalIdentity:
    """A patient new to the practice: the local ID the office manager gives, the name, birth
    date and sex the files say. An ID the archive already knows must be chosen as that
    patient instead (or, being another practice's, is refused)."""
    patient_id = patient_id.strip()
    if not _LOCAL_ID.match(patient_id):
        raise ReconcileError("a local patient ID has 1 to 64 letters, digits, '.', '_', '/' "
                             "or '-'")
    known = session.scalar(select(Patient.id).where(Patient.patient_id == patient_id,
                                                    Patient.issuer_of_patient_id == ""))
    if known is not None:
        raise ReconcileError("this patient ID is taken: choose that patient above, or "
                             "another ID")
    return LocalIdentity(patient_id, "", study.patient_name, study.patient_birth_date,
                         study.patient_sex)


@dataclass(frozen=True)
class Accepted:
    """What accepting did: instances now in the archive, and those it refused; ``forget``:
    the quarantined files to delete once the request has committed."""

    stored: int
    refused: list[tuple[str, str]]
    forget: list[Path] = field(default_factory=list)


def waiting_studies(session: Session, actor: Principal) -> list[InboxStudy]:
    """The practice's waiting studies, oldest first."""
    return list(session.scalars(select(InboxStudy).where(
        InboxStudy.practice_fk == actor.practice_id,
        InboxStudy.state.in_(("waiting", "accepting"))).order_by(InboxStudy.id)))


def get_waiting(session: Session, actor: Principal, public_id: str) -> InboxStudy:
    """One waiting study of the actor's practice, or 404."""
    study = get_study(session, actor, public_id)
    if study.state == "accepting":
        raise AcceptRunning()
    if study.state != "waiting":
        raise NoSuchInboxStudy()
    return study


def get_study(session: Session, actor: Principal, public_id: str) -> InboxStudy:
    """One study of the actor's practice's inbox, waiting, being accepted or accepted (its
    page shows the progress and the final state); rejected ones and others' answer 404."""
    study = session.scalars(select(InboxStudy).where(
        InboxStudy.public_id == public_id,
        InboxStudy.state.in_(("waiting", "accepting", "accepted")),
        InboxStudy.practice_fk == actor.practice_id)).first()
    if study is None or actor.practice_id is None:
        raise NoSuchInboxStudy()
    return study


def _local_patients(actor: Principal) -> Select[Patient]:
    """Patients with a study this office manager may see (his practice's patients)."""
    return select(Patient).where(Patient.id.in_(
        select(Study.patient_fk).where(study_filter(actor))))


def _name_score(uploaded: str, local: str) -> tuple[int, str | None]:
    """Names compared folded (case, accents, apostrophes), "Müller" also as "Mueller"."""
    theirs, ours = search_words(uploaded), search_words(local)
    if not theirs or not ours:
        return 0, None
    their_all, our_all = set(name_search_text(uploaded).split()), set(
        name_search_text(local).split())
    common = len(set(theirs) & our_all) or len(set(ours) & their_all)
    if theirs[0] in our_all or ours[0] in their_all:
        return 3 + max(common - 1, 0), "same family name"
    return (common, "names share a word") if common else (0, None)


def suggestions(session: Session, actor: Principal, study: InboxStudy,
                limit: int = 5) -> list[Suggestion]:
    """Local patients that may be this study's, best first: the same ID, the same birth
    date, the same family name (folded: case, accents, apostrophes)."""
    words = search_words(study.patient_name)
    conditions = []
    if study.patient_id:
        conditions.append(Patient.patient_id == study.patient_id)
    if study.patient_birth_date:
        conditions.append(Patient.patient_birth_date == study.patient_birth_date)
    if words:
        conditions.append(Patient.name_search.like(f"% {words[0]}%"))
    if not conditions:
        return []
    found = []
    for patient in session.scalars(_local_patients(actor).where(or_(*conditions)).limit(200)):
        score, why = 0, []
        if study.patient_id and patient.patient_id == study.patient_id:
            score += 4
            why.append("same patient ID")
        if study.patient_birth_date and patient.patient_birth_date == study.patient_birth_date:
            score += 3
            why.append("same birth date")
        points, reason = _name_score(study.patient_name, patient.patient_name)
        if reason:
            score += points
            why.append(reason)
        if score:
            found.append(Suggestion(patient, score, tuple(why)))
    found.sort(key=lambda s: (-s.score, s.patient.patient_name, s.patient.id))
    return found[:limit]


def find_local_patient(session: Session, actor: Principal, patient_pk: int) -> Patient:
    """A patient of the practice, chosen by his record id."""
    patient = session.scalars(_local_patients(actor).where(Patient.id == patient_pk)).first()
    if patient is None:
        raise ReconcileError("choose a patient of your practice")
    return patient


def practice_physicians(session: Session, actor: Principal) -> list[User]:
    """Physicians of the actor's practice (to whom an accepted study may be given)."""
    users = session.scalars(select(User).where(User.practice_fk == actor.practice_id,
                                               User.active.is_(True)).order_by(User.id))
    return [u for u in users if "physician" in (u.roles or [])]


def uploader_physician(session: Session, actor: Principal,
                       study: InboxStudy) -> User | None:
    """The physician of the practice who uploaded the study himself (signed in), if one
    did: the local referrer the reconcile form offers first."""
    return next((u for u in practice_physicians(session, actor)
                 if study.uploaded_by == f"user:{u.issuer}|{u.subject}"), None)


def referrer_name(session: Session, physician: User | None) -> str:
    """The Referring Physician's Name (PN) that names this physician by his own linked name
    identifier (``name:FAMILY^GIVEN``, the key the access policy matches), or "" when there
    is none: a name typed from his display name could be another physician's key."""
    if physician is None:
        return ""
    keys = session.scalars(select(ReferrerIdentifier.key).where(
        ReferrerIdentifier.user_fk == physician.id, ReferrerIdentifier.key.like("name:%"))
        .order_by(ReferrerIdentifier.id))
    return next((k.partition(":")[2] for k in keys if name_key(k.partition(":")[2]) == k), "")


# What accepting replaces; the originals go into Original Attributes Sequence. The referrer
# too: an outside hospital's referring physician is nobody here, and a local physician whose
# name or code happens to match it must not see the study by the referral rule
# (docs/security.md 9, 53).
COERCED = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
           "AccessionNumber", "ReferringPhysicianName",
           "ReferringPhysicianIdentificationSequence")


def coerce(data: bytes, study: InboxStudy, local: LocalIdentity, accession: str,
           source: str, when: datetime, referrer: str = "") -> bytes:
    """The file with local patient identity, accession number and referrer (``referrer``: a
    PN, or "" for none), the originals kept as PS3.3 C.12.1 describes (Other Patient IDs
    Sequence, Original Attributes Sequence)."""
    ds = pydicom.dcmread(io.BytesIO(data), force=False)
    original = Dataset()
    for keyword in COERCED:
        if keyword in ds:
            setattr(original, keyword, ds[keyword].value)
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([original])
    item.AttributeModificationDateTime = when.astimezone(UTC).strftime("%Y%m%d%H%M%S")
    item.ModifyingSystem = MODIFYING_SYSTEM
    item.SourceOfPreviousValues = source[:64]
    item.ReasonForTheAttributeModification = "COERCE"
    ds.OriginalAttributesSequence = Sequence([*ds.get("OriginalAttributesSequence", []), item])
    if ds.get("PatientID"):
        other = Dataset()
        other.PatientID = ds.PatientID
        if ds.get("IssuerOfPatientID"):
            other.IssuerOfPatientID = ds.IssuerOfPatientID
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = Sequence([*ds.get("OtherPatientIDsSequence", []), other])
    ds.PatientID = local.patient_id
    if local.issuer_of_patient_id:
        ds.IssuerOfPatientID = local.issuer_of_patient_id
    elif "IssuerOfPatientID" in ds:
        del ds.IssuerOfPatientID
    ds.PatientName = local.patient_name
    ds.PatientBirthDate = local.patient_birth_date
    ds.PatientSex = local.patient_sex
    ds.AccessionNumber = accession
    if "IssuerOfAccessionNumberSequence" in ds:
        del ds.IssuerOfAccessionNumberSequence
    ds.ReferringPhysicianName = referrer
    if "ReferringPhysicianIdentificationSequence" in ds:
        del ds.ReferringPhysicianIdentificationSequence
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def accept(session: Session, actor: Principal, q: Quarantine, archive: Archive,
           public_id: str, *, patient_pk: int | None, accession: str, give_to: int | None,
           address: str, new_patient_id: str = "", referrer: int | None = None,
           referrer_chosen: bool = False, database: Database) -> Accepted:
    """Reconcile a waiting study with a local patient (``patient_pk``, or a new one with
    ``new_patient_id``) and move it into the archive.

    The files' referring physician becomes the local referrer: the physician ``referrer``
    when one was chosen (``referrer_chosen``; None: nobody), else the physician who uploaded
    the study himself, else nobody. He is named by his own linked name identifier; one who
    has none gets a grant instead, so that he sees the study either way.

    The study is claimed first ("accepting", committed on its own): a second accept or a
    reject meanwhile (a form sent twice, two office managers) is refused with 409, so nothing
    is stored or audited twice. Its progress file says "running" (not stopped) while it is."""
    study, local, accession, physician, referring, referring_name = _choices(
        session, actor, public_id, patient_pk=patient_pk, accession=accession,
        give_to=give_to, new_patient_id=new_patient_id, referrer=referrer,
        referrer_chosen=referrer_chosen)
    _claim_inline(database, q, study, actor)
    session.expire(study, ["state", "decided_by"])  # "accepting" now, by the claim
    try:
        return _accept_claimed(session, actor, q, archive, study, local, accession, physician,
                               referring, referring_name, address)
    except Exception:
        session.rollback()  # nothing of it kept; on SQLite its write lock is let go
        _release(database, study.id)
        progress_path(q, study.public_id).unlink(missing_ok=True)
        raise


def _claim_inline(database: Database, q: Quarantine, study: InboxStudy,
                  actor: Principal) -> None:
    """Mark a waiting study "accepting" in a transaction of its own (the ingest commits in
    its own: on SQLite the request's write lock would hold it up), or 409."""
    with database.write_transaction() as own:
        marked = own.execute(update(InboxStudy).where(
            InboxStudy.id == study.id, InboxStudy.state == "waiting").values(
            state="accepting", decided_by=actor.audit_name))
        if not cast(CursorResult[Any], marked).rowcount:
            raise AcceptRunning()
    _write_progress(q, study.public_id, {"state": "running", "inline": True, "error": "",
                                         "total": len(study.instances), "done": 0,
                                         "stored": 0, "refused": []})


def _release(database: Database, study_pk: int) -> None:
    """A claimed study whose accept stopped waits again (what moved stays in the archive)."""
    with database.write_transaction() as own:
        own.execute(update(InboxStudy).where(
            InboxStudy.id == study_pk, InboxStudy.state == "accepting").values(
            state="waiting", decided_by=""))


def _accept_claimed(session: Session, actor: Principal, q: Quarantine, archive: Archive,
                    study: InboxStudy, local: LocalIdentity, accession: str,
                    physician: User | None, referring: User | None, referring_name: str,
                    address: str) -> Accepted:
    now = utcnow()
    stored: list[Stored] = []
    refused: list[tuple[str, str]] = []
    waiting = list(study.instances)
    done: list[InboxInstance] = []
    # The ingest commits in transactions of its own: this request's session writes nothing
    # until every batch is in (on SQLite its write lock would hold the ingest up).
    for start in range(0, len(waiting), ACCEPT_BATCH):  # bounded memory for a whole CD
        batch = waiting[start:start + ACCEPT_BATCH]
        results = archive.ingest_many(
            [coerce(q.read(inst.sha256), study, local, accession,
                    study.uploaded_by or "upload", now, referring_name) for inst in batch],
            who=actor.audit_name, source_address=address)
        for inst, result in zip(batch, results, strict=True):
            if isinstance(result, Rejected):
                refused.append((inst.label, result.reason))
            else:
                stored.append(result)
                done.append(inst)
    for inst in done:
        study.instances.remove(inst)
    session.flush()
    forget = _orphans(session, q, [inst.sha256 for inst in done])
    forget.append(progress_path(q, study.public_id))
    archive.after_ingest(stored, via="import", who=actor.audit_name, source_address=address)
    audit.append(session, audit.IMPORT, action="C",
                 outcome=audit.OUTCOME_SUCCESS if not refused else audit.OUTCOME_MINOR_FAILURE,
                 who=actor.audit_name, source_address=address,
                 study_instance_uid=study.study_instance_uid, patient_id=local.patient_id,
                 details={"inbox_study": study.public_id, "reconciled": True,
                          "original_patient_id": study.patient_id,
                          "original_accession": study.accession_number,
                          "accession": accession, "referrer": referring_name,
                          "stored": len(stored),
                          "refused": len(refused), "uploaded_by": study.uploaded_by})
    if not study.instances:
        study.state, study.decided_by, study.decided_at = "accepted", actor.audit_name, now
        study.local_patient_id, study.local_accession_number = local.patient_id, accession
    else:  # the archive refused some: they wait
        study.state, study.decided_by = "waiting", ""
    if physician is not None and stored:
        create_grant(session, actor, user_id=physician.id,
                     study_uid=study.study_instance_uid,
                     reason="outside images accepted from the inbox")
    if referring is not None and not referring_name and stored \
            and (physician is None or physician.id != referring.id):
        create_grant(session, actor, user_id=referring.id,
                     study_uid=study.study_instance_uid,
                     reason="referrer of outside images accepted from the inbox")
    return Accepted(len(stored), refused, forget)


def _orphans(session: Session, q: Quarantine, hashes: list[str]) -> list[Path]:
    """The quarantined files no waiting instance names any more (after a flush): deleted
    only once the request has committed (``delete_files``), never before."""
    named = set(session.scalars(select(InboxInstance.sha256).where(
        InboxInstance.sha256.in_(hashes)))) if hashes else set()
    return [q.kept_path(sha256) for sha256 in dict.fromkeys(hashes) if sha256 not in named]


def delete_files(paths: list[Path]) -> Callable[[], None]:
    """A callback for ``db.after_commit`` that deletes these files."""
    def run() -> None:
        for path in paths:
            path.unlink(missing_ok=True)
    return run


def _choices(session: Session, actor: Principal, public_id: str, *, patient_pk: int | None,
             accession: str, give_to: int | None, new_patient_id: str, referrer: int | None,
             referrer_chosen: bool
             ) -> tuple[InboxStudy, LocalIdentity, str, User | None, User | None, str]:
    """The office manager's choices checked: the study, who it becomes, the accession
    number, the physician given access, the referrer and his name in the files."""
    study = get_waiting(session, actor, public_id)
    local = LocalIdentity.of(find_local_patient(session, actor, patient_pk)) \
        if patient_pk is not None else new_local_patient(session, actor, study, new_patient_id)
    accession = accession.strip()
    if len(accession) > 16 or any(c in accession for c in "\\\x00\r\n"):
        raise ReconcileError("an accession number has at most 16 characters")
    physician = None
    if give_to is not None:
        physician = next((u for u in practice_physicians(session, actor) if u.id == give_to),
                         None)
        if physician is None:
            raise ReconcileError("choose a physician of your practice")
    if referrer_chosen:
        referring = None if referrer is None else next(
            (u for u in practice_physicians(session, actor) if u.id == referrer), None)
        if referrer is not None and referring is None:
            raise ReconcileError("choose a physician of your practice as the referrer")
    else:
        referring = uploader_physician(session, actor, study)
    return study, local, accession, physician, referring, referrer_name(session, referring)


def reject(session: Session, actor: Principal, q: Quarantine, public_id: str, *,
           reason: str, address: str) -> list[Path]:
    """Reject a waiting study, or one whose background accept stopped (what it moved stays
    in the archive): the decision audited (110105). Returns the quarantined files to delete
    once the request has committed (``delete_files``).

    The study is claimed first (``state`` changed only where it still is what was read): an
    accept started meanwhile makes this 409, and this makes that one 409."""
    study = get_study(session, actor, public_id)
    if study.state == "accepting" and not may_continue(read_progress(q, study.public_id)):
        raise AcceptRunning()
    if study.state not in ("waiting", "accepting"):
        raise NoSuchInboxStudy()
    claimed = session.execute(update(InboxStudy).where(
        InboxStudy.id == study.id, InboxStudy.state == study.state).values(
        state="rejected", decided_by=actor.audit_name, decided_at=utcnow()))
    if not cast(CursorResult[Any], claimed).rowcount:
        raise AlreadyHandled()
    session.refresh(study)
    hashes = [inst.sha256 for inst in study.instances]
    count = len(hashes)
    study.instances.clear()
    session.flush()
    forget = [*_orphans(session, q, hashes), progress_path(q, study.public_id)]
    audit.append(session, STUDY_DELETED, action="D", outcome=audit.OUTCOME_SUCCESS,
                 who=actor.audit_name, source_address=address,
                 study_instance_uid=study.study_instance_uid, patient_id=study.patient_id,
                 details={"inbox_study": study.public_id, "rejected": True,
                          "instances": count, "reason": " ".join(reason.split())[:300],
                          "uploaded_by": study.uploaded_by})
    return forget


def counts(session: Session, actor: Principal) -> int:
    """How many studies wait in the practice's inbox."""
    return int(session.scalar(select(func.count(InboxStudy.id)).where(
        InboxStudy.practice_fk == actor.practice_id, InboxStudy.state == "waiting")) or 0)


# -- a large study is accepted by a background job --------------------------------------------
#
# More than ACCEPT_INLINE_MAX files: the request checks the choices, marks the study
# "accepting" (a second accept or a reject is refused while it is) and writes the plan and its
# progress to ``instance/inbox/accepting/<id>.json``; the job ``inbox-accept`` then moves the
# files batch by batch. Each batch is committed: its files enter the archive, then leave the
# inbox. A job that fails or dies is resumable: run again (RQ's retries, or "Continue" on the
# study's page) it takes the files still waiting, and the same choices and time make the same
# bytes, so a batch that was stored but not yet taken out of the inbox is stored once. The
# 110107 record, the study's final state and the grants come once, when every file was tried.

STALE_SECONDS = 600  # a run that wrote no progress for this long may be continued


def progress_path(q: Quarantine, public_id: str) -> Path:
    """The plan and progress of a background accept (never named by anything uploaded)."""
    return q.root / "accepting" / f"{uuid.UUID(public_id)}.json"


def read_progress(q: Quarantine, public_id: str) -> dict[str, Any] | None:
    """The plan and progress of a background accept, if one was started."""
    try:
        found: dict[str, Any] = json.loads(progress_path(q, public_id).read_text())
    except (OSError, ValueError):
        return None
    return found


def _write_progress(q: Quarantine, public_id: str, progress: dict[str, Any]) -> None:
    progress["updated"] = utcnow().isoformat()
    path = progress_path(q, public_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temp.write_text(json.dumps(progress))
    os.replace(temp, path)


def has_plan(progress: dict[str, Any] | None) -> bool:
    """The progress file holds a background accept's plan (an accept in the request's has
    none): a job can continue it."""
    return progress is not None and "local" in progress


def may_continue(progress: dict[str, Any] | None) -> bool:
    """A study "accepting" whose move stopped: failed for good, silent for STALE_SECONDS, or
    without its progress file (lost, or on a disk this node does not share: docs/inbox.md)."""
    if progress is None:
        return True
    if progress.get("state") == "done":
        return False
    if progress.get("state") == "failed":
        return True
    updated = datetime.fromisoformat(progress["updated"])
    return (utcnow() - updated).total_seconds() > STALE_SECONDS


def start_accept(session: Session, actor: Principal, q: Quarantine, public_id: str, *,
                 patient_pk: int | None, accession: str, give_to: int | None, address: str,
                 new_patient_id: str = "", referrer: int | None = None,
                 referrer_chosen: bool = False) -> int:
    """Check the choices as ``accept`` does, mark the study "accepting" and write the plan;
    the caller queues ``inbox-accept`` once this is committed. Returns how many files."""
    study, local, accession, physician, referring, referring_name = _choices(
        session, actor, public_id, patient_pk=patient_pk, accession=accession,
        give_to=give_to, new_patient_id=new_patient_id, referrer=referrer,
        referrer_chosen=referrer_chosen)
    marked = session.execute(update(InboxStudy).where(
        InboxStudy.id == study.id, InboxStudy.state == "waiting").values(
        state="accepting", decided_by=actor.audit_name))
    if not cast(CursorResult[Any], marked).rowcount:  # another request started it meanwhile
        raise AcceptRunning()
    total = len(study.instances)
    _write_progress(q, study.public_id, {
        "actor": actor.id, "who": actor.audit_name, "address": address,
        "source": study.uploaded_by or "upload", "when": utcnow().isoformat(),
        "local": asdict(local), "accession": accession, "referrer_name": referring_name,
        "referring": referring.id if referring else None,
        "give_to": physician.id if physician else None,
        "state": "queued", "error": "", "total": total, "done": 0, "stored": 0,
        "refused": []})
    return total


def run_accept(public_id: str) -> int:
    """The job ``inbox-accept``: move the study's waiting files into the archive, batch by
    batch, writing the progress; one run per study at a time. Returns the files stored.
    Without its plan (the progress file lost) the study waits again: accept it again."""
    from flask import current_app

    from portal.jobs import once_per_cluster

    with once_per_cluster(f"inbox-accept-{public_id}") as mine:
        if not mine:
            return 0
        return _run_accept(current_app.extensions["db"], current_app.extensions["inbox"],
                           current_app.extensions["archive"], public_id)


def _run_accept(database: Database, q: Quarantine, archive: Archive, public_id: str) -> int:
    progress = read_progress(q, public_id)
    if progress is None or not has_plan(progress):
        log.warning("inbox accept %s: no plan in %s; the study waits again", public_id,
                    progress_path(q, public_id))
        with database.write_transaction() as session:
            release_stopped(session, q, public_id)
        return 0
    with database.new_session() as session:
        study = session.scalars(select(InboxStudy).where(
            InboxStudy.public_id == public_id, InboxStudy.state == "accepting")).first()
        if study is None:
            return 0
        tried = {entry[2] for entry in progress["refused"]}
        todo = [(i.id, i.sha256, i.label) for i in study.instances if i.id not in tried]
        session.expunge(study)
    local = LocalIdentity(**progress["local"])
    when = datetime.fromisoformat(progress["when"])
    progress.update(state="running", error="", total=progress["done"] + len(todo))
    _write_progress(q, public_id, progress)
    try:
        for start in range(0, len(todo), ACCEPT_BATCH):
            batch = todo[start:start + ACCEPT_BATCH]
            results = archive.ingest_many(
                [coerce(q.read(sha256), study, local, progress["accession"],
                        progress["source"], when, progress["referrer_name"])
                 for _, sha256, _ in batch],
                who=progress["who"], source_address=progress["address"])
            stored: list[Stored] = []
            moved: list[tuple[int, str]] = []
            for (inst_id, sha256, label), result in zip(batch, results, strict=True):
                if isinstance(result, Rejected):
                    progress["refused"].append([label, result.reason, inst_id])
                else:
                    stored.append(result)
                    moved.append((inst_id, sha256))
            if moved:  # in the archive now: out of the inbox (committed), then the files
                with database.write_transaction() as session:
                    session.execute(delete(InboxInstance).where(
                        InboxInstance.id.in_([inst_id for inst_id, _ in moved])))
                with database.new_session() as session:
                    for _, sha256 in moved:
                        q.forget(session, sha256)
            archive.after_ingest(stored, via="import", who=progress["who"],
                                 source_address=progress["address"])
            progress["done"] += len(batch)
            progress["stored"] += len(stored)
            _write_progress(q, public_id, progress)
        _finish_accept(database, study.id, progress)
    except Exception as exc:
        # The detail (e.g. a path in instance/inbox) goes to the log, not to the page.
        log.exception("inbox accept %s stopped", public_id)
        progress.update(state="failed", error=exc.__class__.__name__)
        _write_progress(q, public_id, progress)
        raise
    progress["state"] = "done"
    _write_progress(q, public_id, progress)
    return int(progress["stored"])


def _finish_accept(database: Database, study_pk: int, progress: dict[str, Any]) -> None:
    """Once every file was tried: the 110107 record, the study's state (accepted, or waiting
    again with the files the archive refused) and the grants, in one transaction. The office
    manager who started it may be gone meanwhile: the study's state and the record come all
    the same (his name is in ``who``); only the grants, given in his name, are not."""
    with database.write_transaction() as session:
        study = session.get(InboxStudy, study_pk)
        if study is None or study.state != "accepting":
            return
        user = session.get(User, progress["actor"])
        if user is None:
            log.warning("inbox accept %s: %s is gone; no grants given", study.public_id,
                        progress["who"])
        refused, stored = len(progress["refused"]), int(progress["stored"])
        local = LocalIdentity(**progress["local"])
        audit.append(session, audit.IMPORT, action="C",
                     outcome=audit.OUTCOME_SUCCESS if not refused
                     else audit.OUTCOME_MINOR_FAILURE,
                     who=progress["who"], source_address=progress["address"],
                     study_instance_uid=study.study_instance_uid, patient_id=local.patient_id,
                     details={"inbox_study": study.public_id, "reconciled": True,
                              "original_patient_id": study.patient_id,
                              "original_accession": study.accession_number,
                              "accession": progress["accession"],
                              "referrer": progress["referrer_name"], "stored": stored,
                              "refused": refused, "uploaded_by": study.uploaded_by,
                              "background": True, "grants": user is not None})
        now = utcnow()
        if not study.instances:
            study.state, study.decided_by, study.decided_at = "accepted", progress["who"], now
            study.local_patient_id = local.patient_id
            study.local_accession_number = progress["accession"]
        else:  # the archive refused some: they wait, with the reasons on the study's page
            study.state, study.decided_by = "waiting", ""
        give_to, referring = progress["give_to"], progress["referring"]
        if user is None:
            return
        actor = user_principal(user, "session")
        if give_to is not None and stored:
            create_grant(session, actor, user_id=give_to, study_uid=study.study_instance_uid,
                         reason="outside images accepted from the inbox")
        if referring is not None and not progress["referrer_name"] and stored \
                and give_to != referring:
            create_grant(session, actor, user_id=referring,
                         study_uid=study.study_instance_uid,
                         reason="referrer of outside images accepted from the inbox")


def release_stopped(session: Session, q: Quarantine, public_id: str) -> None:
    """A study "accepting" without its plan waits again (what moved is in the archive, the
    rest waits in the inbox): the office manager accepts it again."""
    session.execute(update(InboxStudy).where(
        InboxStudy.public_id == public_id, InboxStudy.state == "accepting").values(
        state="waiting", decided_by=""))
    progress_path(q, public_id).unlink(missing_ok=True)
