"""The audit trail: one record per security-relevant event, with DICOM PS3.15 A.5 semantics.

Records are append-only and chained: each one's SHA-256 covers its content and the previous
record's hash, so editing or deleting a sealed row breaks ``verify_chain``
(docs/security.md 41). A PHI read whose record cannot be written is not served: ``record``
raises and the request fails closed; the record row is committed before the answer
(docs/security.md 42) and is chained a moment later.

**Appending takes no lock; one sealer chains.** A writer only inserts its row (content, no
chain fields), in its own transaction or the caller's: writers never wait for each other.
The sealer (``seal``) takes the rows not yet sealed in id order, gives each the next place in
the chain (``seq`` 1, 2, ...), its ``previous_hash`` and ``record_hash``, and moves the
``audit_head`` row (the sealed end), in batches, one transaction a batch.

The chain's order is the order of sealing, not the id order, and this is what makes one
sealer enough: on PostgreSQL ids come from a sequence when a transaction inserts, and
transactions commit in another order than they drew their ids (id 100 may commit after 101
is visible). A sealer that chained by id would have to wait until no transaction that may
still commit a lower id is in flight (``pg_snapshot_xmin`` cannot even see a transaction in
the moment between drawing its id and taking its xid). Instead a row is sealed once it is
committed and visible to the sealer; a row that commits late is sealed in the next batch,
after higher ids. Within a batch the order is by id. Nothing is ever sealed twice or skipped:
the sealer sees only committed rows, and the next batch takes every row still without
``seq`` (a unique column: two sealers could not give two rows one place).

**One sealer at a time.** On SQLite, which has one writer at a time anyway, the writer seals
in its own transaction right after its insert (``append``): the chain is final at commit, as
before, and no background commit ages a request's read snapshot. On PostgreSQL every sealer
first takes the transaction-level advisory lock ``SEAL_LOCK`` with
``pg_try_advisory_xact_lock``: a second one (another node, another worker, ``flask audit
seal --watch``) does not wait, it leaves the work to the one that holds it; and each batch
also locks the ``audit_head`` row, so even a sealer without the advisory lock could not fork
the chain. Who seals on PostgreSQL: every process in the background (``Sealer``: a thread
woken after each commit that appended records, which waits ``Sealer.delay`` to make a batch
and ends when idle); a cluster may run ``flask audit seal --watch`` as well; ``audit
checkpoint`` and ``audit forward`` seal what waits before they sign or send.

Between commit and sealing a record is not yet covered by a hash (normally well under a
second): ``verify_trail`` checks the sealed chain and reports the unsealed records (how many,
how old) on their own; an unsealed row that carries a hash was taken out of the chain.

The chain alone cannot show that its end was cut (delete the newest rows, rewrite the head):
the end is anchored outside the database by signed checkpoints (the sealer signs one at every
``AUDIT_CHECKPOINT_EVERY``-th place in the chain, and ``audit checkpoint`` on demand: count,
last id and hash, time, HMAC-SHA256 with ``AUDIT_CHECKPOINT_KEY``, which only the
configuration holds) appended to a file, and by the hashes the syslog repository received
(``audit_forward``, which sends records in chain order).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    bindparam,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from portal import failures
from portal.access.models import AuditEvent, AuditHead
from portal.db import Database, utcnow, write_connection

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


def _digest(row: Any, previous: str) -> str:
    """The hash of a record (an AuditEvent or a row of its table) placed after ``previous``."""
    content = json.dumps({
        "previous": previous, "at": row.occurred_at.isoformat(),
        "event": row.event_id, "action": row.action, "outcome": row.outcome, "who": row.who,
        "from": row.source_address, "study": row.study_instance_uid, "patient": row.patient_id,
        "details": row.details}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def _head(session: Session) -> AuditHead | None:
    """The sealed end, locked until the transaction ends (None before the first seal)."""
    return session.scalars(select(AuditHead).where(AuditHead.id == 1).with_for_update()).first()


_APPENDED = "audit_appended"
_PENDING_CHECKPOINTS = "audit_checkpoints"


def _values(event: tuple[str, str], *, action: str, outcome: int, who: str,
            source_address: str = "", study_instance_uid: str = "", patient_id: str = "",
            details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The columns of one new record (no chain fields: the sealer sets them)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if event == SECURITY_ALERT:
        # Logs name no patient: the UID and the reason are enough to find the record.
        # Access changes carry their event type code (110135, 110137) rather than a reason.
        what = (details or {}).get("reason") or (details or {}).get("type", "")
        log.warning("security alert: %s (who=%s, study=%s)", what, who, study_instance_uid)
    return {"occurred_at": utcnow().replace(microsecond=0), "event_id": event[0],
            "event_name": event[1], "action": action, "outcome": outcome, "who": who[:256],
            "source_address": source_address[:64], "study_instance_uid": study_instance_uid,
            "patient_id": patient_id[:64], "details": details or {}}


def _appended_in(session: Session) -> None:
    """After a record's insert: SQLite seals at once, PostgreSQL wakes the sealer later."""
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        # One writer at a time: the writer seals in its own transaction (what it seals is
        # rolled back with it), and no commit of a sealer ages a request's read snapshot.
        checkpoints = _checkpoints.get(connection.engine)
        sealed = _seal_batch(connection, 1 << 30, checkpoints.every if checkpoints else 0,
                             wait=True)
        if sealed is not None and sealed[1]:
            session.info.setdefault(_PENDING_CHECKPOINTS, []).extend(sealed[1])
    else:
        session.info[_APPENDED] = True  # wakes this process's sealer after the commit


def append(session: Session, event: tuple[str, str], **fields: Any) -> None:
    """Append one record inside the caller's write transaction (no lock: the sealer chains
    it once the transaction has committed). Fields: ``action``, ``outcome``, ``who``, and
    optionally ``source_address``, ``study_instance_uid``, ``patient_id``, ``details``.

    One Core INSERT, not an ORM object: every ingest appends one. The caller's pending
    objects are flushed first, as before (a flush with nothing pending costs nothing)."""
    values = _values(event, **fields)
    session.flush()
    write_connection(session).execute(_ADD_EVENT, values)
    _appended_in(session)


def record(database: Database, event: tuple[str, str], **fields: Any) -> None:
    """Append one record in its own committed transaction (raises when it cannot).

    For records the request's outcome must not decide (``Database.audit_transaction``): a
    read, durable before what was read leaves (docs/security.md 12, 40), and refusals,
    failures and alerts, kept although the request answers an error. A change is recorded
    with ``append`` in the unit of work that makes it.

    The hot path of every PHI read. On PostgreSQL one statement, one round trip: an INSERT
    in autocommit mode (committed when it returns) on a connection kept for audit appends
    (``_Appender``: no pool pre-ping, no BEGIN or COMMIT of their own, no ORM). SQLite seals
    in the writer's transaction (``_appended_in``)."""
    values = _values(event, **fields)
    engine = database.engine
    if engine is not None and engine.dialect.name == "postgresql":
        _appender(engine).insert(values)
        sealer = _sealers.get(engine)
        if sealer is not None:
            sealer.poke()
        return
    with database.audit_transaction() as session:
        session.connection().execute(_ADD_EVENT, values)
        _appended_in(session)


_INSERT = (
    "INSERT INTO audit_event (occurred_at, event_id, event_name, action, outcome, who, "
    "source_address, study_instance_uid, patient_id, details, previous_hash, record_hash) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, '', '')")


class _Appender:
    """PostgreSQL connections kept for ``record`` (autocommit, a few idle ones kept, last
    used first). A lost connection is dropped and the append tried once more on a new one,
    so a database restart costs no failed read; any other failure, or a second one, is
    raised as SQLAlchemy's error (the request fails closed with 503). Closed with the engine
    (``dispose``); a forked child opens its own."""

    keep = 8

    def __init__(self, engine: Engine) -> None:
        import psycopg

        self._psycopg = psycopg
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        self._args, self._kwargs = list(args), dict(kwargs)
        if "options" not in self._kwargs:  # what portal/db.py gives the engine's connections
            from portal.db import PG_LOCK_TIMEOUT

            self._kwargs["options"] = f"-c lock_timeout={PG_LOCK_TIMEOUT}"
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _connect(self) -> Any:
        # No server-side prepared statements: they do not survive PgBouncer's transaction
        # pooling (docs/cluster.md, "PgBouncer").
        return self._psycopg.connect(*self._args, autocommit=True, prepare_threshold=None,
                                     **self._kwargs)

    def _take(self) -> Any:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets are not ours
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _give_back(self, connection: Any) -> None:
        with self._lock:
            if len(self._idle) < self.keep and self._pid == os.getpid():
                self._idle.append(connection)
                return
        connection.close()

    def insert(self, values: dict[str, Any]) -> None:
        from psycopg.types.json import Json

        params = (values["occurred_at"], values["event_id"], values["event_name"],
                  values["action"], values["outcome"], values["who"], values["source_address"],
                  values["study_instance_uid"], values["patient_id"], Json(values["details"]))
        for attempt in (1, 2):
            connection = None
            try:
                connection = self._take()
                connection.execute(_INSERT, params)
            except self._psycopg.Error as exc:
                # Tried again only when the connection was lost (a restart, an idle
                # connection cut): not on an error of the statement (a lock_timeout).
                lost = connection is None or connection.broken
                if connection is not None:
                    connection.close()
                if attempt == 2 or not lost or \
                        not isinstance(exc, self._psycopg.OperationalError):
                    from sqlalchemy.exc import DBAPIError

                    raise DBAPIError.instance(_INSERT, None, exc, self._psycopg.Error,
                                              hide_parameters=True) from exc
                self.close()  # the server went away: the idle ones are gone as well
                continue
            except BaseException:  # not the database's (details that cannot be encoded...)
                if connection is not None:
                    connection.close()  # never kept in an unknown state, never leaked
                raise
            self._give_back(connection)
            return

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            mine = self._pid == os.getpid()
        for connection in idle if mine else []:
            connection.close()


_appenders: weakref.WeakKeyDictionary[Engine, _Appender] = weakref.WeakKeyDictionary()
_appenders_lock = threading.Lock()


def _appender(engine: Engine) -> _Appender:
    appender = _appenders.get(engine)
    if appender is None:
        with _appenders_lock:
            appender = _appenders.get(engine)
            if appender is None:
                appender = _appenders[engine] = _Appender(engine)
                event.listen(engine, "engine_disposed", lambda _engine: appender.close())
    return appender


# PostgreSQL advisory lock key of the sealer ("audi"): one sealer per cluster at a time.
SEAL_LOCK = 0x61756469


def seal(database: Database, *, batch: int = 2000, wait: bool = False) -> int | None:
    """Chain every committed record not yet sealed, ``batch`` a transaction; return how many
    were sealed, or None when another sealer holds ``SEAL_LOCK`` (it does the work), unless
    ``wait``: then wait for it and seal what it left.

    Signs (after each batch's commit) the checkpoints that fall on the places sealed."""
    engine = database.engine
    if engine is None:
        raise RuntimeError("database not initialised")
    # This process's sealers one after the other, each with its checkpoints written: who
    # waits finds the trail sealed and its checkpoints on disk.
    if not _sealing.acquire(blocking=wait):
        return None
    try:
        return _seal(engine, batch, wait)
    finally:
        _sealing.release()


_sealing = threading.Lock()


def _seal(engine: Engine, batch: int, wait: bool) -> int | None:
    checkpoints = _checkpoints.get(engine)
    every = checkpoints.every if checkpoints is not None else 0
    total = 0
    while True:
        # A Core connection, not a Session: the sealer is no unit of work of any request.
        with engine.connect() as connection:
            connection.execution_options(write=True)  # SQLite: BEGIN IMMEDIATE
            with connection.begin():
                sealed = _seal_batch(connection, batch, every, wait)
        if sealed is None:
            return total or None
        count, due = sealed
        if checkpoints is not None:
            _write_checkpoints(checkpoints, due)
        total += count
        if count < batch:
            return total


# The sealer's statements, built once (SQLite seals in every appending transaction).
_EVENTS, _HEADS = cast(Table, AuditEvent.__table__), cast(Table, AuditHead.__table__)
_ADD_EVENT = insert(_EVENTS)
_HEAD = select(_HEADS.c.last_hash, _HEADS.c.count).where(_HEADS.c.id == 1).with_for_update()
# Only records never chained: one that carries a hash but lost its place was taken out of
# the chain, and chaining it again at the end would bury that (audit verify says it).
_UNSEALED = (select(_EVENTS).where(_EVENTS.c.seq.is_(None), _EVENTS.c.record_hash == "")
             .order_by(_EVENTS.c.id).limit(bindparam("b_limit")))
_SEAL_ROW = (update(_EVENTS).where(_EVENTS.c.id == bindparam("b_id"))
             .values(seq=bindparam("b_seq"), previous_hash=bindparam("b_previous"),
                     record_hash=bindparam("b_hash")))
_MOVE_HEAD = (update(_HEADS).where(_HEADS.c.id == 1)
              .values(last_hash=bindparam("b_last"), count=bindparam("b_count")))


def _seal_batch(connection: Connection, batch: int, every: int,
                wait: bool) -> tuple[int, list[tuple[int, int, str]]] | None:
    if connection.dialect.name == "postgresql":
        if wait:  # released with the transaction, as the try below
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SEAL_LOCK})
        elif not connection.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"),
                                   {"key": SEAL_LOCK}):
            return None
    head = connection.execute(_HEAD).first()
    if head is None:
        connection.execute(insert(_HEADS).values(id=1, last_hash="", count=0))
        previous, place = "", 0
    else:
        previous, place = head[0], head[1]
    rows = connection.execute(_UNSEALED, {"b_limit": batch}).all()
    if not rows:
        return 0, []
    changes: list[dict[str, Any]] = []
    due: list[tuple[int, int, str]] = []
    for row in rows:
        place += 1
        digest = _digest(row, previous)
        changes.append({"b_id": row.id, "b_seq": place, "b_previous": previous,
                        "b_hash": digest})
        if every and place % every == 0:
            due.append((place, row.id, digest))
        previous = digest
    connection.execute(_SEAL_ROW, changes)
    connection.execute(_MOVE_HEAD, {"b_last": previous, "b_count": place})
    return len(rows), due


class Sealer:
    """This process's background sealer for one database: a thread woken after every commit
    that appended records, which waits ``delay`` (so a burst is sealed as one batch), seals,
    and ends after ``idle`` seconds without work (the next record starts it again)."""

    delay = 0.05
    idle = 10.0
    retries = 20  # another sealer held the lock: look again this often

    def __init__(self, database: Database) -> None:
        self._database = weakref.ref(database)
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def poke(self) -> None:
        """Records were committed: seal them soon."""
        self._wake.set()
        with self._lock:
            if self._thread is None or self._pid != os.getpid():  # none yet, or forked
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="audit-sealer",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        busy = failed = 0
        while True:
            if not self._wake.wait(self.idle):
                with self._lock:
                    if not self._wake.is_set():
                        self._thread = None
                        return
            self._wake.clear()
            time.sleep(self.delay)
            database = self._database()
            if database is None or database.engine is None:
                with self._lock:
                    self._thread = None
                return
            try:
                done = seal(database)
                failed = 0
            except Exception as exc:  # the database is down: the records wait, committed
                log.warning("sealing the audit trail failed (%s); the records wait for the "
                            "next record or audit seal", exc.__class__.__name__)
                done, failed = 0, failed + 1
                if failed < 3:
                    time.sleep(1.0)
                    self._wake.set()
            del database
            if done is None:  # another sealer holds the lock: it may have missed ours
                busy += 1
                if busy <= self.retries:
                    time.sleep(self.delay * busy)
                    self._wake.set()
            else:
                busy = 0


# The background sealer of each app's database (set by init_app).
_sealers: weakref.WeakKeyDictionary[Engine, Sealer] = weakref.WeakKeyDictionary()


@event.listens_for(Session, "after_commit")
def _appended(session: Session) -> None:
    if session.info.pop(_APPENDED, False):
        bind = session.get_bind()
        sealer = _sealers.get(bind) if isinstance(bind, Engine) else None
        if sealer is not None:
            sealer.poke()
    due = session.info.pop(_PENDING_CHECKPOINTS, None)
    bind = session.get_bind()
    checkpoints = _checkpoints.get(bind) if due and isinstance(bind, Engine) else None
    if checkpoints is not None:
        # Written once the records' transaction has committed: a checkpoint never names a
        # record that was rolled back.
        _write_checkpoints(checkpoints, due or [])


@event.listens_for(Session, "after_rollback")
def _rolled_back(session: Session) -> None:
    session.info.pop(_APPENDED, None)
    session.info.pop(_PENDING_CHECKPOINTS, None)


def _write_checkpoints(checkpoints: Checkpoints, due: list[tuple[int, int, str]]) -> None:
    for place, record_id, record_hash in due:
        try:
            checkpoints.write(checkpoints.sign(place, record_id, record_hash))
        except OSError as exc:
            # The records are sealed; a missed checkpoint leaves the next one to anchor them.
            log.error("could not write the audit checkpoint: %s", exc.strerror or exc)


def _sealed(session: Session) -> Iterator[AuditEvent]:
    """The sealed records in chain order."""
    yield from session.scalars(select(AuditEvent).where(AuditEvent.seq.is_not(None))
                               .order_by(AuditEvent.seq)).yield_per(1000)


def _broken(row: AuditEvent, place: int, previous: str) -> bool:
    return (row.seq != place or row.previous_hash != previous
            or _digest(row, row.previous_hash) != row.record_hash)


def verify_chain(session: Session) -> tuple[int, int | None]:
    """Recompute every sealed hash in chain order; return (records checked, id of the first
    bad one or None)."""
    previous, checked = "", 0
    for row in _sealed(session):
        if _broken(row, checked + 1, previous):
            return checked, row.id
        previous, checked = row.record_hash, checked + 1
    head = session.get(AuditHead, 1)
    if head is not None and head.last_hash != previous:
        return checked, -1  # records were removed from the end
    return checked, None


CHECKPOINT_FORMAT = "portal-audit-checkpoint/1"
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
    """Seal this app's records in the background, and sign a checkpoint every
    AUDIT_CHECKPOINT_EVERY places of the chain."""
    database = app.extensions["db"]
    if database.engine is None:
        return
    if database.engine.dialect.name != "sqlite":  # SQLite: each writer seals (see append)
        _sealers[database.engine] = Sealer(database)
    checkpoints = checkpoints_from(app.config["PORTAL"], app.instance_path)
    if checkpoints is not None:
        _checkpoints[database.engine] = checkpoints


def checkpoint_now(database: Database, checkpoints: Checkpoints) -> Checkpoint | None:
    """Seal what waits, then sign and write the sealed end of the trail (None when nothing
    is sealed; CheckpointRefused when it no longer holds what the newest checkpoint recorded:
    that needs ``audit verify``)."""
    seal(database, wait=True)
    with database.write_transaction() as session:
        head = _head(session)  # locked: nothing is sealed while the end is read
        last = session.scalars(select(AuditEvent).where(AuditEvent.seq.is_not(None))
                               .order_by(AuditEvent.seq.desc()).limit(1)).first()
        if last is None or head is None:
            return None
        if last.record_hash != head.last_hash or last.seq != head.count:
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
    # Committed records the sealer has not chained yet, and when the oldest was written.
    unsealed: int = 0
    oldest_unsealed: datetime | None = None


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
    for row in _sealed(session):
        if first_bad is None and _broken(row, verdict.checked + 1, previous):
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
    _unsealed(session, verdict)
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


def _unsealed(session: Session, verdict: Verdict) -> None:
    """Count the records not sealed yet (reported apart from the chain), and find unsealed
    rows that carry a hash: sealed once, then taken out of the chain."""
    waiting = AuditEvent.seq.is_(None)
    count, oldest = session.execute(select(func.count(AuditEvent.id),
                                           func.min(AuditEvent.occurred_at)).where(waiting)).one()
    verdict.unsealed = int(count or 0)
    if oldest is not None:
        verdict.oldest_unsealed = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
    stamped = list(session.scalars(select(AuditEvent.id).where(
        waiting, AuditEvent.record_hash != "").order_by(AuditEvent.id).limit(1000)))
    if stamped:
        verdict.problems.append(f"{len(stamped)} record(s) carry a chain hash but no place in "
                                f"the chain ({_span(stamped)}): taken out of the chain")


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
