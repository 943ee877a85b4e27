"""Receiving uploads in chunks, and keeping what they hold in quarantine.

A file is sent in pieces (``Content-Range``); the server's answer to "how much of it do you
have" is the length of its part file on disk, so a dropped connection resumes exactly there.
A complete file is a ZIP (checked as a whole first: entries, total size, ratio, names;
``portal.archive.importer.zip_sources``), a DICOMDIR (the CD's table of contents: skipped) or
a DICOM file, validated exactly as STOW-RS validates (``portal.archive.validate``). What
passes is kept under ``instance/inbox/`` by its SHA-256, apart from the archive, grouped by
study; nothing of it reaches the index until it is accepted (``reconcile.py``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from portal import audit, failures
from portal.archive.importer import Source, UnsafeZip, zip_sources
from portal.archive.space import SpaceRule
from portal.archive.store import StorageFull
from portal.archive.validate import (
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    TRANSFER_SYNTAX_NOT_SUPPORTED,
    Limits,
    Rejected,
    validate_part10,
)
from portal.db import utcnow
from portal.i18n import N_
from portal.inbox.models import InboxFile, InboxInstance, InboxStudy
from portal.index.names import search_words

MAX_CHUNK_BYTES = 8 << 20
MAX_ZIP_ENTRIES = 20_000
# What one upload link may send in all (a CD holds at most 0.7 GB, a DVD 8.5 GB).
MAX_FILES_PER_LINK = 20_000
ABANDONED_AFTER = timedelta(days=7)


class UploadRefused(failures.Invalid):
    """A chunk or a file announcement is refused (400); the reason is for people."""


class StillChecking(failures.Conflict):
    """The complete file is being checked by another request right now (409): ask again."""

    default_reason = "the file is being checked; ask again in a moment"


class WrongOffset(failures.Conflict):
    """A chunk that does not start where the server's copy ends (409): ask, then resume."""

    def __init__(self, received: int) -> None:
        super().__init__(f"the server has {received} bytes of this file; send from there")
        self.received = received


@dataclass(frozen=True)
class Quarantine:
    """Where uploads wait, and the bounds they are checked against."""

    root: Path
    limits: Limits
    max_zip_ratio: int
    max_upload_bytes: int
    # The archive's free-space rule (ARCHIVE_MIN_FREE), applied to the inbox's disk too.
    space_rule: SpaceRule = field(default_factory=SpaceRule)

    @classmethod
    def from_settings(cls, settings: dict[str, Any],
                      space_rule: SpaceRule | None = None) -> Quarantine:
        """The quarantine of a configured app: ``instance/inbox/``."""
        limits = Limits.from_config(settings)
        return cls(root=Path(settings["INSTANCE_PATH"]).resolve() / "inbox", limits=limits,
                   max_zip_ratio=settings["MAX_ZIP_RATIO"],
                   max_upload_bytes=min(settings["MAX_REQUEST_BYTES"] * 4, 8 << 30),
                   space_rule=space_rule or SpaceRule())

    def part_path(self, file: InboxFile) -> Path:
        """The part file of an upload (named by its public id, never by the sender's name)."""
        return self.root / "parts" / file.public_id

    def kept_path(self, sha256: str) -> Path:
        """A quarantined DICOM file."""
        return self.root / "kept" / sha256[:2] / f"{sha256}.dcm"

    def read(self, sha256: str) -> bytes:
        """The bytes of a quarantined file."""
        return self.kept_path(sha256).read_bytes()

    def forget(self, session: Session, sha256: str) -> None:
        """Delete a quarantined file unless another waiting instance still names it."""
        still = session.scalar(select(InboxInstance.id).where(InboxInstance.sha256 == sha256)
                               .limit(1))
        if still is None:
            self.kept_path(sha256).unlink(missing_ok=True)


def _write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull("the inbox's disk is full") from exc
        raise


def outcome(name: str, kind: str, message: str = "", **params: str) -> dict[str, Any]:
    """One file's (or ZIP entry's) outcome as ``file.results`` keeps it: what it IS, the
    English sentence marked for the catalogs (``message``) and its variable parts
    (``params``: technical words such as a transfer syntax, never translated), and the
    sentence filled in English (``reason``: the audit trail, older readers). The uploader's
    page gets it in his language (``shown``; docs/i18n.md)."""
    return {"name": name, "outcome": kind,
            "reason": message % params if params else message,
            "message": message, "params": params}


def shown(result: dict[str, Any], translate: Callable[..., str]) -> dict[str, Any]:
    """A stored outcome as the uploader's page reads it: name, outcome and the reason in the
    reader's language (``translate`` is gettext). Results stored before the reasons were
    kept as messages (a plain English ``reason``) show as they were, translated when the
    catalog knows the sentence."""
    message = result.get("message")
    params = result.get("params") or {}
    reason = str(result.get("reason", ""))
    if isinstance(message, str) and message:
        reason = translate(message, **params) if params else translate(message)
    elif reason:
        reason = translate(reason)
    return {"name": result.get("name", ""), "outcome": result.get("outcome", ""),
            "reason": reason}


def plain_reason(exc: Rejected) -> tuple[str, dict[str, str]]:
    """A refusal in words a patient understands (a sentence marked for the catalogs), with
    the technical reason after it as a parameter."""
    reason = exc.reason
    if "DICM" in reason:
        return N_("not a medical image file (a CD also holds viewer programs and text files; "
                  "they are not needed)"), {}
    if exc.status == TRANSFER_SYNTAX_NOT_SUPPORTED:
        return N_("the image is compressed in a way the portal does not take "
                  "(%(detail)s)"), {"detail": reason}
    if exc.status == SOP_CLASS_NOT_SUPPORTED:
        return N_("this kind of DICOM object is not taken (%(detail)s)"), {"detail": reason}
    if exc.status == OUT_OF_RESOURCES or exc.http_status == 413:
        return N_("the file is too large (%(detail)s)"), {"detail": reason}
    return N_("the file is damaged or incomplete (%(detail)s)"), {"detail": reason}


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword, "")
    return str(value if value is not None else "").replace("\x00", "").strip()[:limit]


def _patient_in(ds: Dataset) -> tuple[str, ...]:
    """Who a file is about, as the inbox compares it: ID, issuer, birth date and the name
    folded (case, accents, spacing)."""
    return (_text(ds, "PatientID", 64), _text(ds, "IssuerOfPatientID", 64),
            _text(ds, "PatientBirthDate", 8),
            " ".join(search_words(_text(ds, "PatientName", 324))))


def _patient_of(study: InboxStudy) -> tuple[str, ...]:
    """Who a waiting study is about (its first file's patient), compared as ``_patient_in``."""
    return (study.patient_id, study.issuer_of_patient_id, study.patient_birth_date,
            " ".join(search_words(study.patient_name)))


def start_file(session: Session, q: Quarantine, *, practice_id: int, link_fk: int | None,
               uploaded_by: str, name: str, size: int) -> InboxFile:
    """Announce a file to be uploaded; its chunks follow."""
    name = name.replace("\x00", "").strip()[:500] or "unnamed file"
    if size < 1:
        raise UploadRefused("the file is empty")
    if size > q.max_upload_bytes:
        raise UploadRefused("the file is larger than %(mib)d MiB", mib=q.max_upload_bytes >> 20)
    if link_fk is not None:
        # A link's visitor is nobody we know: he may not fill the practice's disk.
        files, total = session.execute(
            select(func.count(InboxFile.id), func.coalesce(func.sum(InboxFile.size), 0))
            .where(InboxFile.link_fk == link_fk)).one()
        if files >= MAX_FILES_PER_LINK or int(total) + size > q.max_upload_bytes:
            raise UploadRefused("this link has taken all it may; ask the practice for a new "
                                "one")
    space = q.space_rule.look(q.root)
    if not space.room_for(size):
        if link_fk is not None:  # a visitor is told no sizes of the practice's disk
            raise StorageFull("the practice cannot take files now; try again later")
        raise StorageFull("the inbox has no room for this file now (%(detail)s)",
                          detail=space.describe())
    file = InboxFile(public_id=str(uuid.uuid4()), practice_fk=practice_id, link_fk=link_fk,
                     uploaded_by=uploaded_by, name=name, size=size, received=0,
                     state="receiving", results=[], created_at=utcnow())
    session.add(file)
    session.flush()
    return file


def reap_abandoned(session: Session, q: Quarantine, older_than: timedelta = ABANDONED_AFTER,
                   limit: int = 50) -> int:
    """Files announced long ago and never finished: their pieces are deleted, the file marked
    abandoned (each new announcement sweeps a few, so nothing needs a scheduler)."""
    cutoff = utcnow() - older_than
    stale = list(session.scalars(select(InboxFile).where(
        InboxFile.state == "receiving", InboxFile.created_at < cutoff)
        .order_by(InboxFile.id).limit(limit)))
    for file in stale:
        q.part_path(file).unlink(missing_ok=True)
        file.state = "abandoned"
        file.results = [outcome(file.name, "refused", N_("the upload was not finished in "
                                                         "time; send it again"))]
    return len(stale)


def received_bytes(q: Quarantine, file: InboxFile) -> int:
    """How much of the file the server has: the truth is the part file's length."""
    if file.state != "receiving":
        return file.size
    try:
        return q.part_path(file).stat().st_size
    except FileNotFoundError:
        return 0


def append_chunk(session: Session, q: Quarantine, file: InboxFile, start: int, total: int,
                 data: bytes | bytearray) -> bool:
    """Append one chunk that starts where the server's copy ends; True when the file is
    complete (then processed: ``finish``)."""
    if file.state != "receiving":
        return True
    if total != file.size:
        raise UploadRefused("the chunk names another total size than the file announced")
    if len(data) > MAX_CHUNK_BYTES:
        raise UploadRefused("a chunk is at most %(mib)d MiB", mib=MAX_CHUNK_BYTES >> 20)
    if start + len(data) > file.size or not data:
        raise UploadRefused("the chunk goes past the end of the file")
    path = q.part_path(file)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("ab") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # one writer per file at a time
            have = os.fstat(fh.fileno()).st_size
            if have != start:
                raise WrongOffset(have)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            path.unlink(missing_ok=True)  # nothing half-stored; the sender starts again
            raise StorageFull("the inbox's disk is full") from exc
        raise
    file.received = start + len(data)
    return file.received >= file.size


def finish(session: Session, q: Quarantine, file: InboxFile) -> list[dict[str, Any]]:
    """Check the complete file, keep what passes in quarantine, list every outcome, delete
    the part file, and audit the upload (110107 Import).

    One request at a time checks a file (a lock on its part file): the request that sent the
    last piece, or, when that one died on the way (a worker's timeout), the client's explicit
    ``Content-Range: bytes */total`` later."""
    path = q.part_path(file)
    try:
        guard = path.open("rb")
    except FileNotFoundError as exc:
        raise UploadRefused("the file's pieces are gone; send it again") from exc
    with guard:
        try:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StillChecking() from exc
        if file.state != "receiving":
            return list(file.results)
        return _finish_locked(session, q, file, path)


def _finish_locked(session: Session, q: Quarantine, file: InboxFile,
                   path: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    try:
        with path.open("rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"
        if is_zip:
            try:
                sources = zip_sources(path, max_entries=MAX_ZIP_ENTRIES,
                                      max_ratio=q.max_zip_ratio,
                                      max_entry_bytes=q.limits.max_instance_bytes,
                                      max_total_bytes=q.max_upload_bytes * 4)
            except (UnsafeZip, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
                results.append(outcome(file.name, "refused",
                                       N_("the ZIP file is refused: %(detail)s"),
                                       detail=str(exc)))
                sources = []
            for source in sources:
                label = source.label.partition(":")[2] or source.label
                results.append(_keep_source(session, q, file, Source(label, source.read)))
        elif file.size > q.limits.max_instance_bytes:
            results.append(outcome(file.name, "refused",
                                   N_("the file is too large for one image")))
        else:
            results.append(_keep_source(session, q, file,
                                        Source(file.name, path.read_bytes)))
    finally:
        path.unlink(missing_ok=True)
    file.state, file.results = "done", results
    kept = sum(r["outcome"] == "kept" for r in results)
    refused = [r for r in results if r["outcome"] == "refused"]
    audit.append(session, audit.IMPORT, action="C",
                 outcome=audit.OUTCOME_SUCCESS if not refused else audit.OUTCOME_MINOR_FAILURE,
                 who=file.uploaded_by,
                 details={"inbox_upload": file.public_id, "file": file.name[:200],
                          "kept": kept, "refused": len(refused),
                          "reasons": [r["reason"][:200] for r in refused[:20]]})
    return results


def _keep_source(session: Session, q: Quarantine, file: InboxFile,
                 source: Source) -> dict[str, Any]:
    name = source.label
    if PurePosixPath(name.replace("\\", "/")).name.upper() == "DICOMDIR":
        return outcome(name, "skipped", N_("the CD's table of contents (DICOMDIR); the "
                                           "images are read from their own files"))
    try:
        valid = validate_part10(source.read(), q.limits)
    except Rejected as exc:
        message, params = plain_reason(exc)
        return outcome(name, "refused", message, **params)
    except OSError as exc:
        return outcome(name, "refused", N_("cannot read: %(detail)s"),
                       detail=str(exc.strerror or exc))
    ds = valid.dataset
    # A waiting study is one upload source's (an upload link, or a signed-in uploader) files
    # of one Study Instance UID and one patient: two patients' uploads, or a hostile file
    # reusing another upload's Study UID, never merge into one entry that an office manager
    # would accept for one patient (issue 19).
    study = session.scalars(select(InboxStudy).where(
        InboxStudy.practice_fk == file.practice_fk, InboxStudy.state == "waiting",
        InboxStudy.study_instance_uid == valid.study_instance_uid,
        InboxStudy.link_fk.is_(None) if file.link_fk is None
        else InboxStudy.link_fk == file.link_fk,
        InboxStudy.uploaded_by == file.uploaded_by)).first()
    if study is not None and _patient_of(study) != _patient_in(ds):
        return outcome(name, "refused", N_("this file names another patient than the files "
                                           "of the same study sent before; send each "
                                           "patient's images separately"))
    if study is None:
        study = InboxStudy(
            public_id=str(uuid.uuid4()), practice_fk=file.practice_fk, link_fk=file.link_fk,
            study_instance_uid=valid.study_instance_uid,
            patient_name=_text(ds, "PatientName", 324), patient_id=_text(ds, "PatientID", 64),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID", 64),
            patient_birth_date=_text(ds, "PatientBirthDate", 8),
            patient_sex=_text(ds, "PatientSex", 16),
            accession_number=_text(ds, "AccessionNumber", 64),
            study_date=_text(ds, "StudyDate", 8),
            study_description=_text(ds, "StudyDescription", 200),
            modalities="", uploaded_by=file.uploaded_by, created_at=utcnow(), state="waiting")
        session.add(study)
        session.flush()
    modality = _text(ds, "Modality", 16)
    if modality and modality not in study.modalities.split(","):
        study.modalities = ",".join(filter(None, [*study.modalities.split(","),
                                                  modality]))[:64]
    known = session.scalar(select(InboxInstance.id).where(
        InboxInstance.study_fk == study.id,
        InboxInstance.sop_instance_uid == valid.sop_instance_uid))
    if known is not None:
        return outcome(name, "skipped", N_("already in the inbox"))
    _write_durably(q.kept_path(valid.sha256), valid.data)
    session.add(InboxInstance(study_fk=study.id, sop_instance_uid=valid.sop_instance_uid,
                              series_instance_uid=valid.series_instance_uid,
                              sha256=valid.sha256, label=name[:500]))
    session.flush()
    return outcome(name, "kept")
