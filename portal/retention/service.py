"""Which studies the retention rules no longer keep, their approval, and their deletion.

A study is due when (docs/operations.md, "Retention"):

- at least one practice sees it (the studies its office managers see: ``study_filter``),
  and every practice that sees it has a rule for one of its modalities (or for every
  modality): a practice without a rule keeps its studies for ever;
- the latest day any of those rules keeps it to has passed. A rule keeps a study
  ``keep_years`` after the patient's last study (or after the study itself) and, when the
  study was made before the patient's 18th birthday, at least until the birthday
  ``minors_until_age``; a minors rule and an unknown birth date keep the study;
- no legal hold of its patient is in force (a hold overrides everything);
- it has something here to delete: a study of an external archive only while local copies
  of it exist (it loses only those; its index rows come from the external archive).

Nothing is deleted without an office manager's approval, and a study approved but no longer
due when the deletion runs (a hold placed, a new study of the patient) is kept. The deletion
of one study is one transaction: index rows, stored-object rows, cached copies, grants and
share links of the study, and one audit record (DCM 110105 "DICOM Study Deleted"); its files
and built volumes are removed after the commit, so a crash leaves files without rows
(``archive verify`` reports them, ``reap`` removes them), never rows without files.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from sqlalchemy import Table, delete, func, select
from sqlalchemy.orm import Session

from portal import audit
from portal.access.models import Grant, Practice
from portal.access.policy import study_filter
from portal.access.principal import Principal
from portal.db import Base, Database, utcnow
from portal.index.models import Instance, Patient, Series, Study
from portal.retention.models import LegalHold, RetentionDue, RetentionRule

log = logging.getLogger(__name__)

STUDY_DELETED = ("110105", "DICOM Study Deleted")  # DCM 110105, as portal/audit.py codes events
ADULT_AGE = 18


def _day(text: str) -> date | None:
    """A DICOM DA (YYYYMMDD) as a date; None when empty or not a date."""
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if len(text) >= 8 else None
    except ValueError:
        return None


def add_years(day: date, years: int) -> date:
    """The same day ``years`` later (29 February becomes 28 February)."""
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return day.replace(year=day.year + years, day=28)


def kept_until(rule: RetentionRule, study_date: date | None, last_study: date | None,
               birth: date | None) -> date | None:
    """The last day ``rule`` keeps a study; None: for ever (a date it needs is unknown)."""
    base = last_study if rule.basis == "last_study" else study_date
    if base is None or study_date is None:
        return None
    until = add_years(base, rule.keep_years)
    if rule.minors_until_age is not None:
        if birth is None:
            return None  # it may be a minor's study
        if study_date < add_years(birth, ADULT_AGE):
            until = max(until, add_years(birth, rule.minors_until_age))
    return until


def practice_principal(practice_id: int) -> Principal:
    """The office manager of a practice, as the access rules see him: what the practice sees."""
    return Principal("user", 0, "retention", roles=frozenset({"office_manager"}),
                     practice_id=practice_id)


@dataclass(frozen=True)
class Due:
    """A study the rules no longer keep."""

    study_instance_uid: str
    kept_until: date


def _has_local_files(session: Session, study_uids: set[str]) -> set[str]:
    """Of these studies, the ones with a stored file here (embedded or a cached copy)."""
    from portal.archive.models import StoredObject

    found: set[str] = set()
    uids = sorted(study_uids)
    for start in range(0, len(uids), 500):
        found.update(session.scalars(
            select(Study.study_instance_uid).distinct()
            .join(Series, Series.study_fk == Study.id)
            .join(Instance, Instance.series_fk == Series.id)
            .join(StoredObject, StoredObject.sop_instance_uid == Instance.sop_instance_uid)
            .where(Study.study_instance_uid.in_(uids[start:start + 500]))))
    return found


def due_studies(session: Session, today: date | None = None,
                only: Iterable[str] | None = None) -> list[Due]:
    """Every study due for deletion today (``only``: among these Study Instance UIDs)."""
    today = today or utcnow().date()
    rules: dict[int, list[RetentionRule]] = defaultdict(list)
    for rule in session.scalars(select(RetentionRule)):
        rules[rule.practice_fk].append(rule)
    if not rules:
        return []
    wanted = set(only) if only is not None else None
    seen_by: dict[int, set[int]] = defaultdict(set)  # study id -> practices that see it
    for practice_id in session.scalars(select(Practice.id)):
        query = select(Study.id).where(study_filter(practice_principal(practice_id)))
        if wanted is not None:
            query = query.where(Study.study_instance_uid.in_(sorted(wanted)))
        for study_id in session.scalars(query):
            seen_by[study_id].add(practice_id)
    candidates = [sid for sid, practices in seen_by.items() if practices & rules.keys()]
    if not candidates:
        return []
    held = set(session.scalars(select(LegalHold.patient_fk)
                               .where(LegalHold.released_at.is_(None))))
    answer: list[Due] = []
    for start in range(0, len(candidates), 500):
        rows = session.execute(
            select(Study.id, Study.study_instance_uid, Study.study_date,
                   Study.modalities_in_study, Patient.id, Patient.patient_birth_date)
            .join(Patient, Patient.id == Study.patient_fk)
            .where(Study.id.in_(candidates[start:start + 500]))).all()
        last = dict(session.execute(
            select(Study.patient_fk, func.max(Study.study_date))
            .where(Study.patient_fk.in_({row[4] for row in rows}), Study.study_date != "")
            .group_by(Study.patient_fk)).all())
        for study_id, uid, study_day, modalities, patient_fk, birth in rows:
            if patient_fk in held:
                continue
            until = _until(rules, seen_by[study_id], set(filter(None, modalities.split("\\"))),
                           _day(study_day), _day(last.get(patient_fk) or ""), _day(birth))
            if until is not None and until < today:
                answer.append(Due(uid, until))
    local = _has_local_files(session, {due.study_instance_uid for due in answer})
    return sorted((due for due in answer if due.study_instance_uid in local),
                  key=lambda due: (due.kept_until, due.study_instance_uid))


def _until(rules: dict[int, list[RetentionRule]], practices: set[int], modalities: set[str],
           study_day: date | None, last: date | None, birth: date | None) -> date | None:
    """The latest day any practice that sees the study keeps it; None: kept for ever."""
    latest: date | None = None
    for practice_id in practices:
        applicable = [rule for rule in rules.get(practice_id, [])
                      if not rule.modality or rule.modality in modalities]
        if not applicable:
            return None  # a practice without a rule for it keeps it
        for rule in applicable:
            until = kept_until(rule, study_day, last, birth)
            if until is None:
                return None
            latest = until if latest is None else max(latest, until)
    return latest


def refresh_due(session: Session, today: date | None = None) -> list[Due]:
    """The daily run: list what is due now, and drop from the list what no longer is (an
    approval of a study that is no longer due goes with it). Returns what is due."""
    due = due_studies(session, today)
    now_due = {item.study_instance_uid: item for item in due}
    listed = {row.study_instance_uid: row for row in session.scalars(select(RetentionDue))}
    for uid, row in listed.items():
        if uid not in now_due:
            session.delete(row)
    for uid, item in now_due.items():
        if uid not in listed:
            session.add(RetentionDue(study_instance_uid=uid,
                                     kept_until=item.kept_until.strftime("%Y%m%d")))
    session.flush()
    return due


def approve(session: Session, principal: Principal, who: str,
            study_uids: Sequence[str] | None) -> int:
    """Approve the deletion of listed studies this office manager sees (``None``: all of
    them); returns how many were approved now."""
    query = (select(RetentionDue)
             .join(Study, Study.study_instance_uid == RetentionDue.study_instance_uid)
             .where(study_filter(principal), RetentionDue.approved_at.is_(None)))
    if study_uids is not None:
        query = query.where(RetentionDue.study_instance_uid.in_(list(study_uids)))
    rows = list(session.scalars(query))
    now = utcnow()
    for row in rows:
        row.approved_by, row.approved_at = who[:256], now
    session.flush()
    return len(rows)


# -- the deletion ------------------------------------------------------------------------------

@dataclass
class Deleted:
    """What one study's deletion removed."""

    study_instance_uid: str
    instances: int
    files: list[str]
    local_copies_only: bool
    volume_keys: list[str]
    # (SHA-256, frames) of each stored file: the render cache keys named by its content.
    contents: list[tuple[str, int]] = field(default_factory=list)


def _dependents(parent: str) -> list[tuple[Table, Any]]:
    """Every table with a foreign key to ``parent`` (index tables of other rooms included),
    with the referring column."""
    found = []
    for table in Base.metadata.sorted_tables:
        for fk in table.foreign_keys:
            if fk.column.table.name == parent:
                found.append((table, fk.parent))
    return found


def _delete_rows(session: Session, study: Study) -> tuple[int, list[list[str]]]:
    """Delete the study's index rows (and rows of other tables that refer to them); return
    the number of instances and the SHA-256s of each series (for its built volume)."""
    from portal.archive.models import StoredObject

    series_ids = list(session.scalars(select(Series.id).where(Series.study_fk == study.id)))
    instance_ids = list(session.scalars(select(Instance.id)
                                        .where(Instance.series_fk.in_(series_ids))))
    digests: list[list[str]] = []
    for series_id in series_ids:
        # A volume is built from the series' images (instances with rows): its key is the
        # digest of their SHA-256s (``imaging.volume.content_key``).
        digests.append(list(session.scalars(
            select(StoredObject.sha256)
            .join(Instance, Instance.sop_instance_uid == StoredObject.sop_instance_uid)
            .where(Instance.series_fk == series_id, Instance.rows.is_not(None)))))
    for parent, ids in (("instance", instance_ids), ("series", series_ids),
                        ("study", [study.id])):
        for table, column in _dependents(parent):
            if table.name in {"instance", "series"}:
                continue  # deleted in order below
            session.execute(delete(table).where(column.in_(ids)))
    session.execute(delete(Instance).where(Instance.id.in_(instance_ids)))
    session.execute(delete(Series).where(Series.id.in_(series_ids)))
    session.execute(delete(Study).where(Study.id == study.id))
    return len(instance_ids), digests


def _delete_share_links(session: Session, study_uid: str) -> list[str]:
    """The study leaves every share link; a link that opens nothing else ends with it (its
    sessions too). Returns the public ids of the links that ended."""
    from portal.sharing.models import ShareLink, ShareLinkStudy, ShareSession

    link_ids = set(session.scalars(select(ShareLinkStudy.share_fk)
                                   .where(ShareLinkStudy.study_instance_uid == study_uid)))
    session.execute(delete(ShareLinkStudy).where(ShareLinkStudy.study_instance_uid == study_uid))
    ended: list[str] = []
    for link_id in sorted(link_ids):
        if session.scalar(select(func.count()).select_from(ShareLinkStudy)
                          .where(ShareLinkStudy.share_fk == link_id)):
            continue
        link = session.get(ShareLink, link_id)
        if link is None:
            continue
        ended.append(link.public_id)
        session.execute(delete(ShareSession).where(ShareSession.share_fk == link_id))
        session.delete(link)
    return ended


def delete_study(session: Session, study_uid: str, *, who: str,
                 approved_by: str = "") -> Deleted | None:
    """Delete one study in the caller's transaction (None when it is gone already). A study
    of an external archive loses only its local copies."""
    from portal.archive.models import CachedCopy, ExternalInstance, StoredObject

    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        return None
    patient = session.get(Patient, study.patient_fk)
    instance_uids = list(session.scalars(
        select(Instance.sop_instance_uid).join(Series, Series.id == Instance.series_fk)
        .where(Series.study_fk == study.id)))
    external = (session.scalar(select(func.count()).select_from(ExternalInstance)
                               .where(ExternalInstance.study_instance_uid == study_uid))
                or 0) > 0
    files: list[str] = []
    contents: list[tuple[str, int]] = []
    for start in range(0, len(instance_uids), 500):
        chunk = instance_uids[start:start + 500]
        for key, sha, frames in session.execute(
                select(StoredObject.storage_key, StoredObject.sha256, Instance.number_of_frames)
                .join(Instance, Instance.sop_instance_uid == StoredObject.sop_instance_uid)
                .where(StoredObject.sop_instance_uid.in_(chunk))):
            files.append(key)
            contents.append((sha, frames or 1))
    volume_keys: list[str] = []
    ended: list[str] = []
    count = len(instance_uids)
    if external:
        for start in range(0, len(instance_uids), 500):
            chunk = instance_uids[start:start + 500]
            session.execute(delete(CachedCopy).where(CachedCopy.sop_instance_uid.in_(chunk)))
            session.execute(delete(StoredObject).where(StoredObject.sop_instance_uid.in_(chunk)))
    else:
        from portal.imaging.volume import content_key

        count, digests = _delete_rows(session, study)
        volume_keys = [content_key(series) for series in digests if series]
        for start in range(0, len(instance_uids), 500):
            chunk = instance_uids[start:start + 500]
            session.execute(delete(CachedCopy).where(CachedCopy.sop_instance_uid.in_(chunk)))
            session.execute(delete(StoredObject).where(StoredObject.sop_instance_uid.in_(chunk)))
        session.execute(delete(Grant).where(Grant.study_instance_uid == study_uid))
        ended = _delete_share_links(session, study_uid)
    session.execute(delete(RetentionDue).where(RetentionDue.study_instance_uid == study_uid))
    audit.append(session, STUDY_DELETED, action="D", outcome=audit.OUTCOME_SUCCESS, who=who,
                 study_instance_uid=study_uid,
                 patient_id=patient.patient_id if patient is not None else "",
                 details={"reason": "retention", "approved_by": approved_by,
                          "instances": count, "files": len(files),
                          "local_copies_only": external, "share_links_ended": ended})
    return Deleted(study_uid, count, files, external, volume_keys, contents)


def _remove_files(deleted: Deleted) -> None:
    """After the commit: the study's files and built volumes (a crash here leaves files no
    row names: ``archive verify`` reports them, ``reap`` removes them)."""
    from flask import current_app

    from portal.archive import current_archive

    store = current_archive().store
    for key in deleted.files:
        try:
            store.delete(key)
        except OSError:
            log.exception("a deleted study's file could not be removed; archive verify "
                          "reports it")
    _forget_rendered(deleted.contents)
    if deleted.volume_keys:
        from portal.imaging.service import volume_files

        try:
            folder = volume_files()
        except KeyError:
            return
        for key in deleted.volume_keys:
            for suffix in (".npz", ".building", ".refused"):
                (folder.folder / f"{key}{suffix}").unlink(missing_ok=True)
    current_app.logger.info("retention deleted study %s (%d instances)",
                            deleted.study_instance_uid, deleted.instances)


FRAMES_FORGOTTEN = 64  # renditions of at most this many frames of a file are looked up


def _forget_rendered(contents: list[tuple[str, int]]) -> None:
    """Remove the study's rendered images that a shared render cache (Redis) holds under
    keys that can be named: the thumbnail and the default rendition of each frame (what
    pre-rendering and a first look make) and the series windows. Other renditions (a window
    or size a viewer asked for) are unreachable already (access is checked before the cache
    is asked) and expire with the cache; an in-process cache lives and dies with its
    process."""
    from portal.imaging.cache import RedisCache
    from portal.imaging.rendition import RENDER_VERSION, parse_rendition
    from portal.imaging.service import render_cache
    from portal.redis_link import RedisDown

    try:
        cache = render_cache()
    except KeyError:
        return
    if not isinstance(cache, RedisCache) or not contents:
        return
    renditions = [parse_rendition({}, "", thumbnail=True), parse_rendition({}, "")]
    keys = [f"window:v{RENDER_VERSION}:{sha}" for sha, _frames in contents]
    keys += [rendition.cache_key(sha, frame) for sha, frames in contents
             for frame in range(1, min(frames, FRAMES_FORGOTTEN) + 1)
             for rendition in renditions]
    def forget(chunk: list[str]) -> Callable[[Any], Any]:
        return lambda client: client.delete(*chunk)

    try:
        for start in range(0, len(keys), 500):
            cache.link.call(forget(keys[start:start + 500]))
    except RedisDown:
        log.warning("the render cache is unreachable: a deleted study's rendered images "
                    "expire with it")


def apply_approved(database: Database, *, who: str, today: date | None = None,
                   failed: list[str] | None = None) -> list[Deleted]:
    """Delete every approved study that is still due, one transaction each; a study whose
    transaction fails keeps everything (rows, files, approval), is logged and added to
    ``failed``, and the others go on."""
    with database.new_session() as session:
        approved = {row.study_instance_uid: row.approved_by for row in session.scalars(
            select(RetentionDue).where(RetentionDue.approved_at.is_not(None)))}
    done: list[Deleted] = []
    for uid, approved_by in sorted(approved.items()):
        try:
            deleted = _delete_if_due(database, uid, who, approved_by, today)
        except Exception:
            log.exception("study %s could not be deleted; it is kept whole", uid)
            if failed is not None:
                failed.append(uid)
            continue
        if deleted is not None:
            _remove_files(deleted)
            done.append(deleted)
    return done


def _delete_if_due(database: Database, uid: str, who: str, approved_by: str,
                   today: date | None) -> Deleted | None:
    with database.write_transaction() as session:
        # Checked again inside the deletion's transaction: a hold placed or a study of the
        # patient that arrived since the approval keeps it.
        if not due_studies(session, today, only=[uid]):
            session.execute(delete(RetentionDue).where(RetentionDue.study_instance_uid == uid))
            log.info("study %s is no longer due; its approval is withdrawn", uid)
            return None
        return delete_study(session, uid, who=who, approved_by=approved_by)


def run_daily(today: date | None = None) -> int:
    """The daily job: list what is due, then delete what was approved and still is."""
    from flask import current_app

    database: Database = current_app.extensions["db"]
    with database.write_transaction() as session:
        listed = len(refresh_due(session, today))
    deleted = apply_approved(database, who="retention", today=today)
    log.info("retention: %d studies due, %d deleted", listed, len(deleted))
    return len(deleted)


def apply_now() -> int:
    """The job queued when an office manager approves: delete what was approved."""
    from flask import current_app

    return len(apply_approved(current_app.extensions["db"], who="retention"))
