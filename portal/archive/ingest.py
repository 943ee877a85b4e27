"""Ingest: validate -> store durably -> index -> acknowledge. Every way in calls ``ingest``,
then ``after_ingest`` once its new instances are committed."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pydicom
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from portal import audit
from portal.archive.after import Stored
from portal.archive.models import StoredObject
from portal.archive.same_instance import same_instance
from portal.archive.space import Budget
from portal.archive.store import (
    ArchiveUnavailable,
    CorruptObject,
    EmbeddedStore,
    Mapper,
    StorageFull,
    StoredFile,
)
from portal.archive.validate import (
    DATA_SET_DOES_NOT_MATCH,
    DUPLICATE_CONFLICT,
    OUT_OF_RESOURCES,
    Limits,
    Rejected,
    ValidInstance,
    validate_part10,
)
from portal.db import Database, write_connection
from portal.index.models import Instance, Series, Study
from portal.index.service import (
    IndexConflict,
    NewInstance,
    add_instances,
    header_json,
    instance_values,
)

if TYPE_CHECKING:
    from portal.archive.after import AfterIngest, Via
    from portal.archive.copies import RemoteCopies

log = logging.getLogger(__name__)

_ATTEMPTS = 5
# Refused files of one upload recorded one by one; the rest share one record (docs/security.md 40).
_REFUSALS_ONE_BY_ONE = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# The statements every ingest runs, built once and run with Core (index/service.py says why).
_ADD_OBJECTS = insert(cast(Table, StoredObject.__table__))
_STORED_ANY = select(StoredObject.id).where(
    StoredObject.sop_instance_uid.in_(bindparam("uids", expanding=True))).limit(1)
_IDENTICAL = (
    select(StoredObject.original_sha256, Instance.sop_class_uid, Instance.sop_instance_uid,
           Study.study_instance_uid, Series.series_instance_uid)
    .join(Instance, StoredObject.sop_instance_uid == Instance.sop_instance_uid)
    .join(Series, Instance.series_fk == Series.id)
    .join(Study, Series.study_fk == Study.id)
    .where(StoredObject.original_sha256.in_(bindparam("digests", expanding=True))))


class _Unknown:
    """Not looked up yet (``known`` of ``_prepare``)."""


_UNKNOWN = _Unknown()


@dataclass(frozen=True)
class Archive:
    """The embedded archive: where bytes go, where the index lives, and the bounds.

    With an external archive configured, ``remote`` fetches the instances the index knows
    only from it on first use (``locate``, ``locate_many``, ``read``, ``header``).
    """

    store: EmbeddedStore
    database: Database
    limits: Limits
    remote: RemoteCopies | None = None
    # The steps every way in runs once its new instances are committed (after.py).
    after: AfterIngest | None = field(default=None, compare=False, repr=False)
    # SOP Instance UID -> stored file, for the embedded store only: a stored instance's
    # content never changes (the same UID with other bytes is refused), so this is exact.
    _located: dict[str, StoredFile] = field(default_factory=dict, compare=False, repr=False)

    def ingest(self, data: bytes, *, who: str, source_address: str = "",
               expected_study_uid: str | None = None,
               recorded_as: tuple[str, str] | None = None) -> Stored:
        """Validate and store one Part 10 file; raise ``Rejected`` or ``ArchiveUnavailable``.

        ``expected_study_uid`` (STOW-RS to ``/studies/{study}``) refuses instances of another
        study before anything is written. ``recorded_as`` (C-STORE: 110104, the CLI import:
        110107) writes that audit record in the transaction that indexes the instance.
        """
        try:
            try:
                prepared = self._prepare(data, expected_study_uid)
            except Rejected as exc:
                self.record_rejections([(exc, data)], who=who, source_address=source_address)
                raise
            if isinstance(prepared, Stored):
                return prepared
            [answer] = self._commit_batch([prepared], who, source_address,
                                          recorded=recorded_as)
            if isinstance(answer, Rejected):
                raise answer
            return answer
        except OperationalError as exc:
            log.error("index unavailable: %s", exc.__class__.__name__)
            raise ArchiveUnavailable("the index database is unavailable") from exc

    def ingest_many(self, items: Sequence[bytes | memoryview], *, who: str,
                    source_address: str = "",
                    expected_study_uid: str | None = None,
                    workers: int = 4) -> list[Stored | Rejected]:
        """Store several files (one STOW-RS request): the same checks and durability as
        ``ingest``, as a group commit: files written (each fsynced) in parallel, then one
        fsync of each folder they went to, then the index rows of all in one transaction.

        Each answer is given only after that instance's file is durable and its row committed,
        with the 110104 record of what that transaction kept (``_record_arrival``). An item
        may be a view into the request body: the pool copies it, beside the other writes.
        """
        def digest(data: bytes | memoryview) -> str:
            return hashlib.sha256(data).hexdigest()

        budget = Budget(self.store.space)  # a few statvfs for the batch, not one per file

        def prepare(data: bytes | memoryview, sha256: str) -> Stored | Rejected | _Prepared:
            try:
                return self._prepare(data, expected_study_uid, sync_folder=False,
                                     digest=sha256, known=identical.get(sha256),
                                     budget=budget)
            except Rejected as exc:
                return exc

        try:
            if len(items) == 1:
                digests = [digest(items[0])]
                identical = self._identical_many(digests)
                prepared = [prepare(items[0], digests[0])]
                prepared = self._sync_folders(prepared)
            else:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    digests = list(pool.map(digest, items))
                    identical = self._identical_many(digests)  # one query for all
                    prepared = list(pool.map(prepare, items, digests))
                    # The folders' fsyncs at once too: the file system joins them in one
                    # journal commit instead of one after the other.
                    prepared = self._sync_folders(prepared, pool.map)
            # Conflicts found later, at commit, record their own security alert.
            self.record_rejections([(p, bytes(data))
                                    for p, data in zip(prepared, items, strict=True)
                                    if isinstance(p, Rejected)],
                                   who=who, source_address=source_address)
            results: list[Stored | Rejected | _Prepared] = list(prepared)
            pending = [i for i, p in enumerate(prepared) if isinstance(p, _Prepared)]
            batch = [p for p in prepared if isinstance(p, _Prepared)]
            if batch:
                for index, answer in zip(pending, self._commit_batch(
                        batch, who, source_address, recorded=audit.INSTANCES_TRANSFERRED),
                        strict=True):
                    results[index] = answer
        except OperationalError as exc:
            log.error("index unavailable: %s", exc.__class__.__name__)
            raise ArchiveUnavailable("the index database is unavailable") from exc
        return [r for r in results if not isinstance(r, _Prepared)]

    def after_ingest(self, stored: Sequence[Stored], *, via: Via, who: str,
                     source_address: str, wait: bool = False) -> None:
        """Run the after-ingest steps for the newly stored ones among ``stored``; every way
        in calls this once its instances are committed."""
        if self.after is not None:
            self.after.run(stored, via=via, who=who, source_address=source_address, wait=wait)

    def _sync_folders(self, prepared: list[Stored | Rejected | _Prepared],
                      each: Mapper = map) -> list[Stored | Rejected | _Prepared]:
        """Make the names of the files just written durable (one fsync per folder, run by
        ``each``: a pool's ``map`` runs them side by side); when that fails none of them is,
        and each is refused (507) and its file forgotten."""
        keys = [p.key for p in prepared if isinstance(p, _Prepared)]
        if not keys:
            return prepared
        try:
            self.store.sync_folders(keys, each)
            return prepared
        except OSError as exc:
            log.error("archive write failed: %s", exc.__class__.__name__)
        answers: list[Stored | Rejected | _Prepared] = []
        for p in prepared:
            if isinstance(p, _Prepared):
                self._forget(p.key, p.valid)
                p = Rejected("the archive has no room for this instance now", OUT_OF_RESOURCES,
                             507, p.valid.sop_class_uid, p.valid.sop_instance_uid)
            answers.append(p)
        return answers

    def _prepare(self, data: bytes | memoryview, expected_study_uid: str | None, *,
                 sync_folder: bool = True, digest: str | None = None,
                 known: Stored | _Unknown | None = _UNKNOWN,
                 budget: Budget | None = None) -> Stored | _Prepared:
        """Validate and durably write the file (its folder's fsync left to the caller unless
        ``sync_folder``); answer at once when it is already stored. ``digest`` and ``known``
        (what ``_identical`` answers for it) when the caller has them already; ``budget``: the
        free space its batch shares."""
        digest = digest or hashlib.sha256(data).hexdigest()
        if isinstance(known, _Unknown):
            known = self._identical(digest)
        if known is not None and expected_study_uid in (None, known.study_instance_uid):
            return known
        valid = validate_part10(bytes(data), self.limits, digest)  # a view is copied here
        if expected_study_uid is not None and valid.study_instance_uid != expected_study_uid:
            raise Rejected("the instance belongs to a different study than the URL names",
                           DATA_SET_DOES_NOT_MATCH, 409, valid.sop_class_uid,
                           valid.sop_instance_uid)
        try:  # ARCHIVE_MIN_FREE: refused before the disk is full (archive/space.py)
            self.store.check_room(len(valid.data), budget)
        except StorageFull as exc:
            raise Rejected(str(exc), OUT_OF_RESOURCES, 507, valid.sop_class_uid,
                           valid.sop_instance_uid) from exc
        if self.remote is not None and self.remote.write_through:
            # A cluster (docs/cluster.md): the external archive keeps the copy that counts,
            # so an instance is acknowledged only once it has it (ExternalUnavailable: 503).
            self.remote.client.store(valid.data, valid.sop_instance_uid)
        try:
            key = self.store.write(valid.data, valid.sha256, sync_folder=sync_folder)
        except (OSError, StorageFull) as exc:
            log.error("archive write failed: %s", exc.__class__.__name__)
            raise Rejected("the archive has no room for this instance now",
                           OUT_OF_RESOURCES, 507, valid.sop_class_uid,
                           valid.sop_instance_uid) from exc
        # The row's values now, on the thread that parsed the file (ingest_many's pool).
        return _Prepared(valid, key, instance_values(
            valid.dataset, sop_class_uid=valid.sop_class_uid,
            sop_instance_uid=valid.sop_instance_uid,
            transfer_syntax_uid=valid.transfer_syntax_uid))

    @staticmethod
    def _index(session: Session, items: Sequence[_Prepared], who: str,
               source_address: str) -> None:
        """Add the index rows of written files inside the caller's transaction: a few
        statements for all of them (``add_instances``, one INSERT of their stored objects)."""
        add_instances(session, [NewInstance(
            i.valid.dataset, i.valid.study_instance_uid, i.valid.series_instance_uid, i.values)
            for i in items])
        write_connection(session).execute(_ADD_OBJECTS, [{
            "sop_instance_uid": i.valid.sop_instance_uid, "storage_key": i.key,
            "size": len(i.valid.data), "sha256": i.valid.sha256,
            "original_sha256": i.valid.original_sha256} for i in items])
        for valid in (i.valid for i in items):
            if not valid.preamble_zeroed:
                continue
            audit.append(session, audit.SECURITY_ALERT, action="C",
                         outcome=audit.OUTCOME_MINOR_FAILURE, who=who,
                         source_address=source_address,
                         study_instance_uid=valid.study_instance_uid,
                         details={"reason": "non-zero preamble zeroed",
                                  "sop_instance_uid": valid.sop_instance_uid,
                                  "original_sha256": valid.original_sha256,
                                  "stored_sha256": valid.sha256})

    @staticmethod
    def _record_arrival(session: Session, items: Sequence[_Prepared], who: str,
                        source_address: str, event: tuple[str, str]) -> None:
        """One ``event`` record (110104 for STOW-RS and C-STORE, 110107 for the CLI import)
        per study of the instances this transaction indexes, in the same transaction as their
        rows: a crash or a failed insert rolls back both, a kill -9 after the commit cannot
        leave instances without their record, and each record counts exactly what its commit
        kept (docs/security.md 40)."""
        for study, count in Counter(i.valid.study_instance_uid for i in items).items():
            audit.append(session, event, action="C",
                         outcome=audit.OUTCOME_SUCCESS, who=who, source_address=source_address,
                         study_instance_uid=study, details={"instances": count})

    @staticmethod
    def _stored(item: _Prepared) -> Stored:
        valid = item.valid
        return Stored("stored", valid.sop_class_uid, valid.sop_instance_uid,
                      valid.study_instance_uid, valid.series_instance_uid)

    def _commit_batch(self, batch: list[_Prepared], who: str, source_address: str, *,
                      recorded: tuple[str, str] | None) -> list[Stored | Rejected]:
        """Index a batch in one transaction (with its ``recorded`` audit records, if any);
        anything unusual falls back to one by one."""
        try:
            with self.database.write_transaction() as session:
                uids = [item.valid.sop_instance_uid for item in batch]
                if len(set(uids)) != len(uids) or session.connection().execute(
                        _STORED_ANY, {"uids": uids}).first():
                    raise _Fallback
                self._index(session, batch, who, source_address)
                if recorded is not None:
                    self._record_arrival(session, batch, who, source_address, recorded)
            return [self._stored(item) for item in batch]
        except (_Fallback, IntegrityError, IndexConflict, DataError, OverflowError):
            pass  # rolled back: settle each instance on its own, with exact answers
        except OperationalError as exc:
            for item in batch:
                self._forget(item.key, item.valid)
            log.error("index unavailable: %s", exc.__class__.__name__)
            raise ArchiveUnavailable("the index database is unavailable") from exc
        answers: list[Stored | Rejected] = []
        for item in batch:
            try:
                answers.append(self._commit_one(item, who, source_address, recorded))
            except Rejected as exc:
                answers.append(exc)
        return answers

    def _commit_one(self, item: _Prepared, who: str, source_address: str,
                    recorded: tuple[str, str] | None) -> Stored:
        """Index one written file; its answer is final once this returns or raises."""
        valid, key = item.valid, item.key
        for _attempt in range(_ATTEMPTS):
            try:
                with self.database.write_transaction() as session:
                    existing = session.scalars(select(StoredObject).where(
                        StoredObject.sop_instance_uid == valid.sop_instance_uid)).first()
                    if existing is not None:
                        raise _AlreadyStored(existing.sha256, existing.storage_key)
                    self._index(session, [item], who, source_address)
                    if recorded is not None:
                        self._record_arrival(session, [item], who, source_address, recorded)
            except _AlreadyStored as exc:
                if exc.sha256 != valid.sha256:
                    self._forget(key, valid)
                return self._already(valid, exc.sha256, who, source_address,
                                     exc.storage_key)
            except IntegrityError:
                continue  # another writer stored it (or its study) first: look again
            except IndexConflict as exc:
                self._forget(key, valid)
                self._alert(valid, str(exc), who, source_address)
                raise Rejected(str(exc), DATA_SET_DOES_NOT_MATCH, 409, valid.sop_class_uid,
                               valid.sop_instance_uid) from exc
            except (DataError, OverflowError) as exc:
                # A value the index cannot hold (the net under index/service.py's bounds):
                # this instance alone is refused, and its file goes with it.
                self._forget(key, valid)
                raise Rejected("a value of this instance is out of the range the index "
                               "stores", DATA_SET_DOES_NOT_MATCH, 400, valid.sop_class_uid,
                               valid.sop_instance_uid) from exc
            except OperationalError as exc:
                self._forget(key, valid)
                log.error("index unavailable: %s", exc.__class__.__name__)
                raise ArchiveUnavailable("the index database is unavailable") from exc
            return self._stored(item)
        raise ArchiveUnavailable("too much contention storing this instance; retry")

    def _identical(self, digest: str) -> Stored | None:
        """Exactly these bytes were validated and stored before: answer without parsing."""
        return self._identical_many([digest]).get(digest)

    def _identical_many(self, digests: Sequence[str]) -> dict[str, Stored]:
        """``_identical`` for several files, one query per 500."""
        found: dict[str, Stored] = {}
        unique = sorted(set(digests))
        with self.database.new_session() as session:
            connection = session.connection()
            for start in range(0, len(unique), 500):
                for sha, *row in connection.execute(
                        _IDENTICAL, {"digests": unique[start:start + 500]}):
                    found.setdefault(sha, Stored("already_stored", *row))
        return found

    def _already(self, valid: ValidInstance, stored_sha256: str, who: str,
                 source_address: str, storage_key: str = "") -> Stored:
        """The answer for a SOP Instance UID already stored: success when it is the same
        instance (equal bytes, or, compared only then, the same data set and decoded pixels
        in another encoding), else a conflict with a security alert."""
        if stored_sha256 != valid.sha256 and not self._same_content(
                valid, stored_sha256, storage_key):
            reason = "SOP Instance UID already stored with different content"
            self._alert(valid, reason, who, source_address)
            raise Rejected(reason, DUPLICATE_CONFLICT, 409, valid.sop_class_uid,
                           valid.sop_instance_uid)
        return Stored("already_stored", valid.sop_class_uid, valid.sop_instance_uid,
                      valid.study_instance_uid, valid.series_instance_uid)

    def _same_content(self, valid: ValidInstance, stored_sha256: str, storage_key: str) -> bool:
        """Whether differing bytes still encode the stored instance (PS3.5 10: a lossless
        change of transfer syntax or File Meta is the same instance); bounded by the size
        limits the incoming file already passed."""
        if not storage_key:
            return False
        try:
            stored = self.store.read(storage_key, stored_sha256)
        except (OSError, CorruptObject):
            return False  # cannot be compared: the conflict stands
        return same_instance(stored, valid.data)

    def _forget(self, key: str, valid: ValidInstance) -> None:
        """Remove a file whose index row was not committed, unless a row uses it."""
        try:
            with self.database.new_session() as session:
                if session.scalars(select(StoredObject.id).where(
                        StoredObject.storage_key == key)).first() is None:
                    self.store.delete(key)
        except OperationalError:
            pass  # the start-up reaper removes unreferenced files

    def record_rejections(self, rejected: Sequence[tuple[Rejected, bytes | None]], *, who: str,
                          source_address: str) -> None:
        """One 110107 Import failure record per refused file, all in one transaction; past
        ``_REFUSALS_ONE_BY_ONE`` files of one call, one more record counts the rest by reason
        (a request of 10,000 one-byte parts must not write 10,000 records).

        A record holds the reason without the quoted data after its colon (a parser's
        message may quote header values), the UIDs the file named and its SHA-256.
        """
        if not rejected:
            return

        def reason(exc: Rejected) -> str:
            return _CONTROL.sub(" ", exc.reason.split(": ", 1)[0])[:160]

        each, rest = rejected[:_REFUSALS_ONE_BY_ONE], rejected[_REFUSALS_ONE_BY_ONE:]
        try:
            with self.database.write_transaction() as session:
                for exc, data in each:
                    details: dict[str, Any] = {"reason": reason(exc),
                                               "status": f"0x{exc.status:04X}"}
                    if exc.sop_instance_uid:
                        details["sop_instance_uid"] = exc.sop_instance_uid[:64]
                    if data is not None:
                        details["received_sha256"] = hashlib.sha256(data).hexdigest()
                        details["size"] = len(data)
                    audit.append(session, audit.IMPORT, action="C",
                                 outcome=audit.OUTCOME_MINOR_FAILURE, who=who,
                                 source_address=source_address, details=details)
                if rest:
                    reasons = Counter(reason(exc) for exc, _data in rest)
                    audit.append(session, audit.IMPORT, action="C",
                                 outcome=audit.OUTCOME_MINOR_FAILURE, who=who,
                                 source_address=source_address, details={
                                     "reason": "more refused files of the same upload",
                                     "files": len(rest),
                                     "size": sum(len(data or b"") for _exc, data in rest),
                                     "reasons": dict(reasons.most_common(10))})
        except OperationalError:
            log.error("could not record %d rejected upload(s)", len(rejected))

    def _alert(self, valid: ValidInstance, reason: str, who: str, source_address: str) -> None:
        try:
            with self.database.write_transaction() as session:
                self._record_alert(session, valid, reason, who, source_address)
        except OperationalError:
            log.error("could not record security alert: %s", reason)

    @staticmethod
    def _record_alert(session: Session, valid: ValidInstance, reason: str, who: str,
                      source_address: str) -> None:
        audit.append(session, audit.SECURITY_ALERT, action="C",
                           outcome=audit.OUTCOME_SERIOUS_FAILURE, who=who,
                           source_address=source_address,
                           study_instance_uid=valid.study_instance_uid,
                           details={"reason": reason,
                                    "sop_instance_uid": valid.sop_instance_uid,
                                    "received_sha256": valid.sha256})

    def locate(self, sop_instance_uid: str) -> StoredFile:
        """Where an instance's bytes are and their SHA-256 (which names the content in cache
        keys); KeyError when it is not stored. An instance known only from the external
        archive is fetched first (``ArchiveUnavailable`` when that fails)."""
        if self.remote is not None:
            return self._locate_or_fetch(sop_instance_uid, self.remote)
        known = self._located.get(sop_instance_uid)
        # A file re-encoded (archive/compress.py) or deleted (retention) by another process
        # is gone from its old place: the index says where it is now.
        if known is not None and os.path.exists(known.path):
            return known
        with self.database.reading() as session:
            row = session.execute(select(StoredObject.storage_key, StoredObject.sha256).where(
                StoredObject.sop_instance_uid == sop_instance_uid)).first()
        if row is None:
            raise KeyError(sop_instance_uid)
        found = self.store.locate(row.storage_key, row.sha256)
        if len(self._located) >= 200_000:
            self._located.clear()
        self._located[sop_instance_uid] = found
        return found

    def _locate_or_fetch(self, sop_instance_uid: str, remote: RemoteCopies) -> StoredFile:
        from portal.archive.models import CachedCopy

        with self.database.reading() as session:
            row = session.execute(
                select(StoredObject.storage_key, StoredObject.sha256, CachedCopy.last_used_at)
                .outerjoin(CachedCopy,
                           CachedCopy.sop_instance_uid == StoredObject.sop_instance_uid)
                .where(StoredObject.sop_instance_uid == sop_instance_uid)).first()
        if row is None:
            return remote.fetch(sop_instance_uid)
        if row.last_used_at is not None and (
                time.time() - row.last_used_at.timestamp() > remote.touch_interval):
            remote.touch(sop_instance_uid)
        # The shared index of a cluster may name a file another node wrote (docs/cluster.md).
        return remote.restore(sop_instance_uid, row.storage_key, row.sha256)

    def locate_many(self, sop_instance_uids: list[str]) -> dict[str, StoredFile]:
        """Where several instances are, in one query (fetching external ones first)."""

        def query(uids: Collection[str]) -> dict[str, StoredFile]:
            with self.database.reading() as session:
                rows = session.execute(
                    select(StoredObject.sop_instance_uid, StoredObject.storage_key,
                           StoredObject.sha256)
                    .where(StoredObject.sop_instance_uid.in_(uids))).all()
            return {uid: self.store.locate(key, sha) for uid, key, sha in rows}

        found = query(sop_instance_uids)
        missing = set(sop_instance_uids) - set(found)
        if missing and self.remote is not None:
            self.remote.fetch_many(missing)
            found.update(query(missing))
        if self.remote is not None:  # files another node of a cluster wrote
            remote = self.remote
            found = {uid: remote.restore(uid, self.store.key_for(where.sha256), where.sha256)
                     for uid, where in found.items()}
        return found

    def read(self, sop_instance_uid: str) -> bytes:
        """The stored bytes of one instance, hash-verified."""
        return self.locate(sop_instance_uid).read()

    def reap(self, older_than: float = 300.0) -> tuple[int, int]:
        """Remove crash leftovers: temp files, and files that no index row references.

        Only files older than ``older_than`` seconds go, so a write in flight in another
        process (the SCP, another worker) is never mistaken for a leftover.
        """
        temps = self.store.reap_temp(older_than)
        with self.database.new_session() as session:
            known = set(session.scalars(select(StoredObject.storage_key)))
        orphans = 0
        now = time.time()
        for key in list(self.store.keys()):
            if key in known:
                continue
            try:
                age = now - self.store.path_of(key).stat().st_mtime
            except FileNotFoundError:
                continue
            if age >= older_than:
                self.store.delete(key)
                orphans += 1
        return temps, orphans


    def header(self, sop_instance_uid: str) -> dict[str, Any]:
        """The instance's header as DICOM JSON, made from the file once and then kept (in a
        transaction of its own: a cache of the file, whatever the request answers)."""
        with self.database.reading() as session:
            instance = session.scalars(select(Instance).where(
                Instance.sop_instance_uid == sop_instance_uid)).first()
            if instance is None:
                raise KeyError(sop_instance_uid)
            if instance.header is not None:
                return instance.header
        data = self.read(sop_instance_uid)
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        header = header_json(ds)
        with self.database.write_transaction() as session:
            session.execute(update(Instance).where(
                Instance.sop_instance_uid == sop_instance_uid).values(header=header))
        return header

    def headers(self, sop_instance_uids: list[str]) -> list[dict[str, Any]]:
        """Headers of several instances (made and kept where missing)."""
        with self.database.reading() as session:
            known: dict[str, dict[str, Any] | None] = dict(session.execute(
                select(Instance.sop_instance_uid, Instance.header)
                .where(Instance.sop_instance_uid.in_(sop_instance_uids))).all())
        return [known.get(uid) or self.header(uid) for uid in sop_instance_uids]

    def verify(self) -> Iterator[tuple[str, str | None]]:
        """Check every stored file: yield (SOP Instance UID, problem or None); then yield
        (storage key, problem) for every file no index row names: a write cut short by a
        crash (``reap`` removes it at the next start once it is 5 minutes old)."""
        with self.database.new_session() as session:
            rows = list(session.execute(select(StoredObject.sop_instance_uid,
                                               StoredObject.storage_key,
                                               StoredObject.sha256)))
        # A cluster's node holds only what it wrote or fetched; the external archive has
        # the rest, fetched on first use (docs/cluster.md).
        elsewhere = self.remote is not None and self.remote.write_through
        for uid, key, sha in rows:
            try:
                self.store.read(key, sha)
                yield uid, None
            except CorruptObject:
                yield uid, "SHA-256 mismatch"
            except FileNotFoundError:
                yield uid, None if elsewhere else "file missing"
        known = {key for _uid, key, _sha in rows}
        for key in list(self.store.keys()):
            if key not in known:
                yield key, "unreferenced file (left by an interrupted write)"


@dataclass(frozen=True)
class _Prepared:
    """A validated instance whose file is written and durable, its row not yet committed."""

    valid: ValidInstance
    key: str
    values: dict[str, Any]  # of its index row (``instance_values``)


class _Fallback(Exception):
    pass


class _AlreadyStored(Exception):
    def __init__(self, sha256: str, storage_key: str = "") -> None:
        super().__init__(sha256)
        self.sha256 = sha256
        self.storage_key = storage_key
