"""The audit trail: one record per security-relevant event, with DICOM PS3.15 A.5 semantics.

Records are append-only and chained: each one's SHA-256 covers its content and the previous
record's hash, so editing or deleting a row breaks ``verify_chain``. Appending locks the one
``audit_head`` row, which orders concurrent writers. A PHI read whose record cannot be written
is not served: ``record`` raises and the request fails closed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from portal.access.models import AuditEvent, AuditHead
from portal.db import Database, utcnow

log = logging.getLogger(__name__)

# DICOM "DCM" event ids (PS3.16 CID 400) and event type codes (CID 401).
APPLICATION_ACTIVITY = ("110100", "Application Activity")
AUDIT_LOG_USED = ("110101", "Audit Log Used")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
EXPORT = ("110106", "Export")
QUERY = ("110112", "Query")
SECURITY_ALERT = ("110113", "Security Alert")
USER_AUTHENTICATION = ("110114", "User Authentication")
EMERGENCY_OVERRIDE = ("110127", "Emergency Override Started")
EMERGENCY_OVERRIDE_STOPPED = ("110138", "Emergency Override Stopped")
# Event type codes carried in details["type"].
LOGIN, LOGOUT = "110122", "110123"
OBJECT_SECURITY_CHANGED, USER_SECURITY_CHANGED = "110135", "110137"

OUTCOME_SUCCESS = 0
OUTCOME_MINOR_FAILURE = 4
OUTCOME_SERIOUS_FAILURE = 8

ACTIONS = frozenset("CRUDE")


def _digest(row: AuditEvent) -> str:
    content = json.dumps({
        "previous": row.previous_hash, "at": row.occurred_at.isoformat(),
        "event": row.event_id, "action": row.action, "outcome": row.outcome, "who": row.who,
        "from": row.source_address, "study": row.study_instance_uid, "patient": row.patient_id,
        "details": row.details}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def _head(session: Session) -> AuditHead:
    head = session.scalars(select(AuditHead).where(AuditHead.id == 1).with_for_update()).first()
    if head is None:
        head = AuditHead(id=1, last_hash="", count=0)
        session.add(head)
        session.flush()
    return head


def append(session: Session, event: tuple[str, str], *, action: str, outcome: int, who: str,
           source_address: str = "", study_instance_uid: str = "", patient_id: str = "",
           details: dict[str, Any] | None = None) -> AuditEvent:
    """Append one record inside the caller's write transaction."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    head = _head(session)
    row = AuditEvent(occurred_at=utcnow().replace(microsecond=0), event_id=event[0],
                     event_name=event[1], action=action, outcome=outcome, who=who[:256],
                     source_address=source_address[:64], study_instance_uid=study_instance_uid,
                     patient_id=patient_id[:64], details=details or {},
                     previous_hash=head.last_hash)
    row.record_hash = _digest(row)
    session.add(row)
    head.last_hash = row.record_hash
    head.count += 1
    session.flush()
    if event == SECURITY_ALERT:
        # Logs name no patient: the UID and the reason are enough to find the record.
        log.warning("security alert: %s (who=%s, study=%s)",
                    (details or {}).get("reason", ""), who, study_instance_uid)
    return row


def record(database: Database, event: tuple[str, str], **fields: Any) -> None:
    """Append one record in its own committed transaction (raises when it cannot)."""
    for _attempt in range(3):
        try:
            with database.write_transaction() as session:
                append(session, event, **fields)
            return
        except IntegrityError:
            continue  # two writers created the head row at once: try again
    raise RuntimeError("could not append to the audit trail")


def verify_chain(session: Session) -> tuple[int, int | None]:
    """Recompute every hash; return (records checked, id of the first bad one or None)."""
    previous, checked = "", 0
    for row in session.scalars(select(AuditEvent).order_by(AuditEvent.id)).yield_per(1000):
        if row.previous_hash != previous or _digest(row) != row.record_hash:
            return checked, row.id
        previous, checked = row.record_hash, checked + 1
    head = session.get(AuditHead, 1)
    if head is not None and head.last_hash != previous:
        return checked, -1  # records were removed from the end
    return checked, None


def iter_events(session: Session, *, who: str = "", study: str = "", event_id: str = "",
                limit: int = 500, offset: int = 0) -> Iterator[AuditEvent]:
    """Newest first, filtered by who, study and event id."""
    stmt = select(AuditEvent)
    if who:
        stmt = stmt.where(AuditEvent.who.contains(who))
    if study:
        stmt = stmt.where(AuditEvent.study_instance_uid == study)
    if event_id:
        stmt = stmt.where(AuditEvent.event_id == event_id)
    yield from session.scalars(stmt.order_by(AuditEvent.id.desc()).limit(limit).offset(offset))


# Who has already been recorded reading which study, for principals without a browser
# session (scripts, viewers with bearer tokens, machine clients): (who, study) -> until.
_recent_reads: dict[tuple[str, str], float] = {}
_READ_WINDOW = 600.0
# Writes the read records while the request goes on rendering or reading the images.
_read_writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="audit-read")
_pending_reads: dict[tuple[str, str], Future[None]] = {}


def record_study_read(database: Database, *, who: str, study_instance_uid: str,
                      patient_id: str, source_address: str, seen: set[str] | None,
                      what: str) -> Future[None] | None:
    """Start writing one 110103 record per study per session (or per ten minutes without a
    session); None when this read is already recorded.

    The write (one durable commit) runs beside whatever the caller does next; the caller
    must wait for the returned future before it sends anything, and serve nothing when it
    raises (fail closed). ``seen`` is the session's set of studies already recorded (None
    for sessionless callers); the study is added to it at once and must be taken out again
    if the write fails.
    """
    import time

    if seen is not None:
        if study_instance_uid in seen:
            return None
        seen.add(study_instance_uid)
    # The write runs in another thread: resolve a request-bound proxy (portal.db.db) here.
    database = getattr(database, "_get_current_object", lambda: database)()
    key = (who, study_instance_uid)
    if seen is None:
        pending = _pending_reads.get(key)
        if pending is not None:
            return pending  # a parallel request's write: this one waits for it too
        if _recent_reads.get(key, 0.0) > time.monotonic():
            return None

    def write() -> None:
        record(database, INSTANCES_ACCESSED, action="R", outcome=OUTCOME_SUCCESS, who=who,
               source_address=source_address, study_instance_uid=study_instance_uid,
               patient_id=patient_id, details={"what": what})
        if seen is None:
            if len(_recent_reads) > 50_000:
                _recent_reads.clear()
            _recent_reads[key] = time.monotonic() + _READ_WINDOW

    future = _read_writer.submit(write)
    if seen is None:
        _pending_reads[key] = future
        future.add_done_callback(lambda done: _pending_reads.pop(key, None)
                                 if _pending_reads.get(key) is done else None)
    return future
