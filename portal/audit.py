"""The audit trail: one record per security-relevant event, with DICOM PS3.15 A.5 semantics.

Records are append-only and chained: each one's SHA-256 covers its content and the previous
record's hash, so editing or deleting a row breaks ``verify_chain``. Appending locks the one
``audit_head`` row, which orders concurrent writers. A PHI read whose record cannot be written
is not served: ``record`` raises and the request fails closed.

The chain alone cannot show that its end was cut (delete the newest rows, rewrite the head):
the end is anchored outside the database by signed checkpoints (every
``AUDIT_CHECKPOINT_EVERY`` records and on ``audit checkpoint``: count, last id and hash, time,
HMAC-SHA256 with ``AUDIT_CHECKPOINT_KEY``, which only the configuration holds) appended to a
file, and by the hashes the syslog repository received (``audit_forward``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from portal import failures
from portal.access.models import AuditEvent, AuditHead
from portal.db import Database, utcnow

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

# DICOM "DCM" event ids (PS3.16 CID 400) and event type codes (CID 401).
APPLICATION_ACTIVITY = ("110100", "Application Activity")
AUDIT_LOG_USED = ("110101", "Audit Log Used")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
EXPORT = ("110106", "Export")
IMPORT = ("110107", "Import")
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
    checkpoints = _checkpoints.get(session.get_bind()) if _checkpoints else None  # type: ignore[arg-type]
    if checkpoints is not None and head.count % checkpoints.every == 0:
        # Written once the transaction commits (see _write_pending_checkpoint): a checkpoint
        # must never name a record that was rolled back.
        session.info[_PENDING_CHECKPOINT] = (checkpoints, head.count, row.id, row.record_hash)
    if event == SECURITY_ALERT:
        # Logs name no patient: the UID and the reason are enough to find the record.
        log.warning("security alert: %s (who=%s, study=%s)",
                    (details or {}).get("reason", ""), who, study_instance_uid)
    return row


def record(database: Database, event: tuple[str, str], **fields: Any) -> None:
    """Append one record in its own committed transaction (raises when it cannot).

    For records the request's outcome must not decide (``Database.audit_transaction``): a
    read, durable before what was read leaves (docs/security.md 12, 40), and refusals,
    failures and alerts, kept although the request answers an error. A change is recorded
    with ``append`` in the unit of work that makes it."""
    for _attempt in range(3):
        try:
            with database.audit_transaction() as session:
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


CHECKPOINT_FORMAT = "portal-audit-checkpoint/1"
_PENDING_CHECKPOINT = "audit_checkpoint"
# The engine of each app that signs checkpoints (set by init_app from its configuration).
_checkpoints: weakref.WeakKeyDictionary[Engine, Checkpoints] = weakref.WeakKeyDictionary()


class CheckpointRefused(failures.Conflict):
    """The trail's current end contradicts the newest signed checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """The trail's end at one moment: how many records, the newest one's id and hash."""

    count: int
    record_id: int
    record_hash: str
    at: str
    mac: str = ""

    def signed_text(self) -> bytes:
        """The bytes the HMAC covers."""
        return (f"{CHECKPOINT_FORMAT}|{self.count}|{self.record_id}|{self.record_hash}|"
                f"{self.at}").encode()

    def to_json(self) -> str:
        """One line of the checkpoint file."""
        return json.dumps({"count": self.count, "id": self.record_id, "hash": self.record_hash,
                           "at": self.at, "mac": self.mac}, separators=(",", ":"))

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Checkpoint:
        """Parse the fields of a file line or a forwarded message (ValueError if malformed)."""
        try:
            checkpoint = cls(int(fields["count"]), int(fields["id"]), str(fields["hash"]),
                             str(fields["at"]), str(fields["mac"]))
        except (KeyError, TypeError) as exc:
            raise ValueError("not a checkpoint") from exc
        if checkpoint.count < 1 or checkpoint.record_id < 1:
            raise ValueError("not a checkpoint")
        return checkpoint


class Checkpoints:
    """Signed checkpoints in an append-only file; the key lives only in the configuration."""

    def __init__(self, path: Path, key: str, every: int) -> None:
        self.path = path
        self._key = key.encode("utf-8")
        self.every = every

    def sign(self, count: int, record_id: int, record_hash: str) -> Checkpoint:
        """A checkpoint of this end of the trail, stamped now and signed."""
        unsigned = Checkpoint(count, record_id, record_hash,
                              utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"))
        return replace(unsigned, mac=hmac.new(self._key, unsigned.signed_text(),
                                              hashlib.sha256).hexdigest())

    def genuine(self, checkpoint: Checkpoint) -> bool:
        """Whether the checkpoint was signed with this key and not changed since."""
        expected = hmac.new(self._key, checkpoint.signed_text(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, checkpoint.mac)

    def write(self, checkpoint: Checkpoint) -> None:
        """Append one line (O_APPEND: lines of several processes never interleave)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (checkpoint.to_json() + "\n").encode("utf-8"))
            os.fsync(fd)  # one fsync per checkpoint, not per record
        finally:
            os.close(fd)

    def read(self, tail: int | None = None) -> tuple[list[Checkpoint], list[int]]:
        """The genuine checkpoints and the line numbers of the ones that are not (the last
        ``tail`` bytes only when given; line numbers then count from there)."""
        try:
            with self.path.open("rb") as fh:
                if tail is not None:
                    fh.seek(max(0, fh.seek(0, os.SEEK_END) - tail))
                    fh.readline()  # the first line may be cut: skip it
                text = fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return [], []
        genuine: list[Checkpoint] = []
        forged: list[int] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                checkpoint = Checkpoint.from_fields(json.loads(line))
            except (ValueError, AttributeError):
                forged.append(number)
                continue
            (genuine.append(checkpoint) if self.genuine(checkpoint)
             else forged.append(number))
        return genuine, forged

    def newest(self) -> Checkpoint | None:
        """The genuine checkpoint covering the most records (read from the file's end)."""
        genuine, _forged = self.read(tail=64 << 10)
        return max(genuine, key=lambda c: c.count, default=None)


def checkpoints_from(settings: dict[str, Any], instance_path: str) -> Checkpoints | None:
    """The configured checkpoints, or None without AUDIT_CHECKPOINT_KEY."""
    key = settings.get("AUDIT_CHECKPOINT_KEY")
    if not key:
        return None
    path = settings.get("AUDIT_CHECKPOINT_FILE") or Path(instance_path) / "audit-checkpoints.log"
    return Checkpoints(Path(path), key, settings.get("AUDIT_CHECKPOINT_EVERY") or 100)


def init_app(app: Flask) -> None:
    """Sign a checkpoint every AUDIT_CHECKPOINT_EVERY records of this app's database."""
    checkpoints = checkpoints_from(app.config["PORTAL"], app.instance_path)
    engine = app.extensions["db"].engine
    if checkpoints is not None and engine is not None:
        _checkpoints[engine] = checkpoints


@event.listens_for(Session, "after_commit")
def _write_pending_checkpoint(session: Session) -> None:
    pending = session.info.pop(_PENDING_CHECKPOINT, None)
    if pending is None:
        return
    checkpoints, count, record_id, record_hash = pending
    try:
        checkpoints.write(checkpoints.sign(count, record_id, record_hash))
    except OSError as exc:
        # The record is committed; a missed checkpoint only leaves the next one to anchor it.
        log.error("could not write the audit checkpoint: %s", exc.strerror or exc)


@event.listens_for(Session, "after_rollback")
def _drop_pending_checkpoint(session: Session) -> None:
    session.info.pop(_PENDING_CHECKPOINT, None)


def checkpoint_now(database: Database, checkpoints: Checkpoints) -> Checkpoint | None:
    """Sign and write the trail's current end (None when it is empty; CheckpointRefused when
    it no longer holds what the newest checkpoint recorded: that needs ``audit verify``)."""
    with database.write_transaction() as session:
        head = _head(session)  # locked: no record is appended while the end is read
        last = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())
                               .limit(1)).first()
        if last is None:
            return None
        if last.record_hash != head.last_hash:
            raise CheckpointRefused("the head row does not match the newest record; "
                                    "run audit verify")
        newest = checkpoints.newest()
        if newest is not None:
            anchored = session.get(AuditEvent, newest.record_id)
            if head.count < newest.count or anchored is None \
                    or anchored.record_hash != newest.record_hash:
                raise CheckpointRefused("the trail no longer holds what the checkpoint of "
                                        f"{newest.at} recorded; run audit verify")
        checkpoint = checkpoints.sign(head.count, last.id, last.record_hash)
        checkpoints.write(checkpoint)
    return checkpoint


@dataclass
class Verdict:
    """What ``verify_trail`` found: records checked, problems (each breaks the trail) and
    notes (what was and was not compared)."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _span(ids: list[int]) -> str:
    ids = sorted(ids)
    return f"id {ids[0]}" if len(ids) == 1 else f"ids {ids[0]} to {ids[-1]}"


def verify_trail(session: Session, *, checkpoints: Checkpoints | None,
                 received: Iterable[tuple[int, str]] | None = None,
                 received_checkpoints: Iterable[Checkpoint] = ()) -> Verdict:
    """Check the chain, its end against the signed checkpoints, and the records against
    what the audit repository received ((id, hash) pairs), when given."""
    verdict = Verdict()
    genuine: list[Checkpoint] = []
    if checkpoints is not None:
        genuine, forged = checkpoints.read()
        if forged:
            verdict.problems.append(
                f"checkpoint file line(s) {', '.join(map(str, forged[:10]))} do not verify "
                "with AUDIT_CHECKPOINT_KEY: edited, or signed with another key")
        for checkpoint in received_checkpoints:
            if checkpoints.genuine(checkpoint):
                genuine.append(checkpoint)
            else:
                verdict.problems.append(f"a checkpoint the repository received ({checkpoint.at})"
                                        " does not verify with AUDIT_CHECKPOINT_KEY")
    pairs = list(received or [])
    wanted = {c.record_id for c in genuine} | {record_id for record_id, _ in pairs}
    found: dict[int, str] = {}
    previous, first_bad = "", None
    for row in session.scalars(select(AuditEvent).order_by(AuditEvent.id)).yield_per(1000):
        if first_bad is None and (row.previous_hash != previous
                                  or _digest(row) != row.record_hash):
            first_bad = row.id
        if row.id in wanted:
            found[row.id] = row.record_hash
        previous = row.record_hash
        verdict.checked += 1
    if first_bad is not None:
        verdict.problems.append(f"record {first_bad} was altered (or one before it removed)")
    head = session.get(AuditHead, 1)
    if head is not None and head.last_hash != previous:
        verdict.problems.append("the head row does not match the newest record: "
                                "records were removed from the end")
    if checkpoints is None:
        verdict.notes.append("AUDIT_CHECKPOINT_KEY is not set: no signed checkpoint anchors "
                             "the end of the trail")
    elif not genuine:
        if verdict.checked >= checkpoints.every:
            verdict.problems.append(
                f"no signed checkpoint in {checkpoints.path.name} although the trail holds "
                f"{verdict.checked} records: the file was removed (after first configuring "
                "AUDIT_CHECKPOINT_KEY, run audit checkpoint once)")
        else:
            verdict.notes.append("no signed checkpoint yet")
    else:
        newest = max(genuine, key=lambda c: c.count)
        if newest.count > verdict.checked:
            verdict.problems.append(
                f"the signed checkpoint of {newest.at} covers {newest.count} records but the "
                f"database holds {verdict.checked}: records were cut from the end")
        gone, changed = _compare(((c.record_id, c.record_hash) for c in genuine), found)
        if gone:
            verdict.problems.append(f"record(s) named by signed checkpoints are missing "
                                    f"({_span(gone)}): the trail was cut")
        if changed:
            verdict.problems.append(f"record(s) named by signed checkpoints were replaced "
                                    f"({_span(changed)})")
        verdict.notes.append(f"newest signed checkpoint: {newest.count} records at {newest.at}")
    if received is None:
        return verdict
    missing, differ = _compare(pairs, found)
    if missing:
        verdict.problems.append(f"{len(missing)} record(s) the audit repository received are "
                                f"not in the database ({_span(missing)}): the trail was cut")
    if differ:
        verdict.problems.append(f"{len(differ)} record(s) differ from what the audit repository "
                                f"received ({_span(differ)})")
    verdict.notes.append(f"audit repository: {len(pairs)} record(s) compared")
    return verdict


def _compare(expected: Iterable[tuple[int, str]],
             found: dict[int, str]) -> tuple[list[int], list[int]]:
    """Record ids that an anchor (a checkpoint, the repository) names but the database lacks,
    and those whose hash differs from the anchor's."""
    named = list(expected)
    return (sorted({i for i, _ in named if i not in found}),
            sorted({i for i, h in named if i in found and found[i] != h}))


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
