"""Local copies of instances that live in an external archive: fetched with WADO-RS on first
use, validated and hash-checked like any ingest, kept in a bounded cache (least recently used
copies are evicted first). Instances ingested directly are never evicted: only rows of
``cached_copy`` are candidates.

A fetched instance must be exactly the one the index describes: same SOP Instance, series and
study UIDs and the same patient. Anything else is refused with a security alert and never
served, so an archive that answers with another patient's image cannot leak it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, select, update
from sqlalchemy.exc import IntegrityError

from portal import audit
from portal.archive.external import DicomWebArchive, ExternalNotFound, ExternalUnavailable
from portal.archive.models import CachedCopy, ExternalInstance, StoredObject
from portal.archive.store import EmbeddedStore, StorageFull, StoredFile
from portal.archive.validate import Limits, Rejected, validate_part10
from portal.db import Database, utcnow
from portal.index.models import Instance, Patient, Series, Study
from portal.log import carry

log = logging.getLogger(__name__)

_PARALLEL_FETCHES = 4


class RemoteCopies:
    """Fetch-on-first-use of external instances into the local store, bounded LRU.

    Parameters
    ----------
    store, database, limits
        The embedded archive's store, index database and ingest bounds.
    client
        The external DICOMweb archive.
    cache_bytes
        Most bytes of cached copies kept; older copies are evicted after each fetch.
    touch_interval
        Seconds between two updates of a copy's ``last_used_at`` (a write per view would
        cost more than the view).
    """

    def __init__(self, store: EmbeddedStore, database: Database, limits: Limits,
                 client: DicomWebArchive, cache_bytes: int, touch_interval: float = 30.0,
                 write_through: bool = False) -> None:
        self.write_through = write_through
        self.store = store
        self.database = database
        self.limits = limits
        self.client = client
        self.cache_bytes = cache_bytes
        self.touch_interval = touch_interval
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- fetching ----------------------------------------------------------------------------

    def fetch(self, sop_instance_uid: str) -> StoredFile:
        """The local copy of an external instance, fetched now if needed.

        Raises ``KeyError`` when the index does not know it as an external instance and
        ``ExternalUnavailable`` when the archive cannot deliver it (or delivers something else).
        """
        lock = self._lock_for(sop_instance_uid)
        with lock:
            try:
                local = self._local(sop_instance_uid)
                if local is not None:
                    return local
                return self._fetch(sop_instance_uid)
            finally:
                with self._locks_guard:
                    self._locks.pop(sop_instance_uid, None)

    def fetch_many(self, sop_instance_uids: Iterable[str]) -> None:
        """Make sure these instances are local (a few fetches in parallel)."""
        uids = sorted(set(sop_instance_uids))
        if not uids:
            return
        if len(uids) == 1:
            self.fetch(uids[0])
            return
        with ThreadPoolExecutor(max_workers=_PARALLEL_FETCHES,
                                thread_name_prefix="wado-fetch") as pool:
            for _ in pool.map(carry(self._fetch_if_external), uids):  # the request's id
                pass

    def _fetch_if_external(self, sop_instance_uid: str) -> None:
        # Not external and not stored: the caller sees it missing.
        with contextlib.suppress(KeyError):
            self.fetch(sop_instance_uid)

    def _lock_for(self, uid: str) -> threading.Lock:
        with self._locks_guard:
            lock = self._locks.get(uid)
            if lock is None:
                lock = self._locks[uid] = threading.Lock()
            return lock

    def _local(self, uid: str) -> StoredFile | None:
        with self.database.new_session() as session:
            row = session.execute(select(StoredObject.storage_key, StoredObject.sha256)
                                  .where(StoredObject.sop_instance_uid == uid)).first()
        return None if row is None else self.store.locate(row.storage_key, row.sha256)

    def _fetch(self, uid: str) -> StoredFile:
        with self.database.new_session() as session:
            row = session.execute(
                select(ExternalInstance.study_instance_uid,
                       ExternalInstance.series_instance_uid, Patient.patient_id,
                       Patient.issuer_of_patient_id)
                .join(Instance, Instance.sop_instance_uid == ExternalInstance.sop_instance_uid)
                .join(Series, Instance.series_fk == Series.id)
                .join(Study, Series.study_fk == Study.id)
                .join(Patient, Study.patient_fk == Patient.id)
                .where(ExternalInstance.sop_instance_uid == uid)).first()
        if row is None:
            raise KeyError(uid)
        study_uid, series_uid, patient_id, issuer = row
        started = time.monotonic()
        try:
            data = self.client.retrieve_instance(study_uid, series_uid, uid,
                                                 self.limits.max_instance_bytes)
        except ExternalNotFound:
            raise ExternalUnavailable(
                "the image archive no longer has this image", retry_after=60) from None
        digest = hashlib.sha256(data).hexdigest()
        try:
            valid = validate_part10(data, self.limits, digest)
        except Rejected as exc:
            self._alert(study_uid, uid, f"external archive sent an invalid instance: {exc}")
            raise ExternalUnavailable("the image archive sent an invalid image") from None
        got_patient = str(valid.dataset.get("PatientID", "") or "").strip()[:64]
        got_issuer = str(valid.dataset.get("IssuerOfPatientID", "") or "").strip()[:64]
        expected = (patient_id, issuer if patient_id else "")
        if (valid.sop_instance_uid, valid.series_instance_uid, valid.study_instance_uid) != \
                (uid, series_uid, study_uid) or (got_patient, got_issuer if got_patient
                                                 else "") != expected:
            self._alert(study_uid, uid,
                        "external archive sent an instance that does not match the index")
            raise ExternalUnavailable("the image archive sent a different image than asked for")
        try:
            key = self.store.write(valid.data, valid.sha256)
        except (OSError, StorageFull) as exc:
            raise ExternalUnavailable("no room to keep a copy of this image now") from exc
        try:
            with self.database.write_transaction() as session:
                session.add(StoredObject(sop_instance_uid=uid, storage_key=key,
                                         size=len(valid.data), sha256=valid.sha256,
                                         original_sha256=valid.original_sha256))
                now = utcnow()  # not the server default: SQLite's has whole seconds only
                session.add(CachedCopy(sop_instance_uid=uid, size=len(valid.data),
                                       fetched_at=now, last_used_at=now))
                session.execute(update(Instance).where(
                    Instance.sop_instance_uid == uid, Instance.transfer_syntax_uid == "")
                    .values(transfer_syntax_uid=valid.transfer_syntax_uid))
        except IntegrityError:
            # Another process fetched it first; its row and identical file stand.
            local = self._local(uid)
            if local is None:
                raise
            return local
        log.info("fetched an external instance (%d bytes) in %.0f ms", len(valid.data),
                 (time.monotonic() - started) * 1000)
        self.evict(keep={uid})
        return self.store.locate(key, valid.sha256)

    def restore(self, sop_instance_uid: str, storage_key: str, sha256: str) -> StoredFile:
        """The file of an instance the shared index holds, on this node.

        In a cluster every node has its own instance folder (docs/cluster.md): a row written
        by another node names a file this node may not have. It is fetched from the external
        archive (which got it first, ``write_through``) and must be exactly the bytes the
        index's SHA-256 names; the content-addressed store puts it under the same key.
        """
        located = self.store.locate(storage_key, sha256)
        if os.path.exists(located.path):
            return located
        lock = self._lock_for(sop_instance_uid)
        with lock:
            try:
                if os.path.exists(located.path):
                    return located
                with self.database.new_session() as session:
                    row = session.execute(
                        select(Study.study_instance_uid, Series.series_instance_uid)
                        .select_from(Instance)
                        .join(Series, Instance.series_fk == Series.id)
                        .join(Study, Series.study_fk == Study.id)
                        .where(Instance.sop_instance_uid == sop_instance_uid)).first()
                if row is None:
                    raise KeyError(sop_instance_uid)
                study_uid, series_uid = row
                try:
                    data = self.client.retrieve_instance(study_uid, series_uid,
                                                         sop_instance_uid,
                                                         self.limits.max_instance_bytes)
                except ExternalNotFound:
                    raise ExternalUnavailable("the image archive does not have this image",
                                              retry_after=60) from None
                if hashlib.sha256(data).hexdigest() != sha256:
                    self._alert(study_uid, sop_instance_uid,
                                "external archive sent other bytes than the index names")
                    raise ExternalUnavailable(
                        "the image archive sent a different image than asked for")
                try:
                    key = self.store.write(data, sha256)
                except (OSError, StorageFull) as exc:
                    raise ExternalUnavailable("no room to keep a copy of this image now") \
                        from exc
                return self.store.locate(key, sha256)
            finally:
                with self._locks_guard:
                    self._locks.pop(sop_instance_uid, None)

    def _alert(self, study_uid: str, uid: str, reason: str) -> None:
        log.error("%s", reason)
        try:
            audit.record(self.database, audit.SECURITY_ALERT, action="R",
                         outcome=audit.OUTCOME_SERIOUS_FAILURE, who="archive:external",
                         source_address=self.client.source[:64], study_instance_uid=study_uid,
                         details={"reason": reason, "sop_instance_uid": uid})
        except Exception:  # the refusal stands even when the alert cannot be written
            log.exception("could not record a security alert")

    # -- least recently used -----------------------------------------------------------------

    def touch(self, sop_instance_uid: str) -> None:
        """Note a use of a cached copy (at most once per ``touch_interval``)."""
        now = utcnow()
        with self.database.write_transaction() as session:
            session.execute(update(CachedCopy).where(
                CachedCopy.sop_instance_uid == sop_instance_uid,
                CachedCopy.last_used_at <= now - timedelta(seconds=self.touch_interval))
                .values(last_used_at=now))

    def usage(self) -> tuple[int, int]:
        """(number, bytes) of cached copies."""
        with self.database.new_session() as session:
            count, size = session.execute(
                select(func.count(CachedCopy.id), func.coalesce(func.sum(CachedCopy.size), 0))
            ).one()
        return int(count), int(size)

    def evict(self, keep: set[str] | None = None) -> int:
        """Remove least recently used copies until the cache fits; return how many went.

        Only cached copies are candidates; ``keep`` (the instances being served) stay even
        if the cache is over its size for a moment.
        """
        keep = keep or set()
        _count, total = self.usage()
        if total <= self.cache_bytes:
            return 0
        with self.database.new_session() as session:
            candidates = session.execute(
                select(CachedCopy.sop_instance_uid, CachedCopy.size, StoredObject.storage_key)
                .join(StoredObject,
                      StoredObject.sop_instance_uid == CachedCopy.sop_instance_uid)
                .order_by(CachedCopy.last_used_at, CachedCopy.id)).all()
        evicted = 0
        for uid, size, key in candidates:
            if total <= self.cache_bytes:
                break
            if uid in keep:
                continue
            with self.database.write_transaction() as session:
                # A DELETE's result is a CursorResult, which has the row count.
                gone = cast(CursorResult[Any], session.execute(delete(CachedCopy).where(
                    CachedCopy.sop_instance_uid == uid))).rowcount
                if not gone:
                    continue  # another process evicted it
                session.execute(delete(StoredObject).where(
                    StoredObject.sop_instance_uid == uid))
            # The row is gone first, so no reader is sent to a file that is about to vanish.
            self.store.delete(key)
            total -= size
            evicted += 1
        return evicted
