"""Keep the index in step with an external DICOMweb archive (QIDO-RS + WADO-RS metadata).

A run walks the archive's studies page by page (QIDO-RS ``limit``/``offset``); a study whose
instance count (NumberOfStudyRelatedInstances) the index already has is skipped without another
request; any other study's metadata (WADO-RS ``/studies/{uid}/metadata``) becomes index rows for
its new instances, all of one study in one transaction, each marked as ``external_instance``
(its bytes are fetched on first view). Nothing is copied but the headers.

Incremental: a run after a completed one only asks for studies dated from
``ARCHIVE_SYNC_LOOKBACK_DAYS`` before that completed run; studies that change later (new
series) are seen by their instance count; ``--full`` walks everything.

Resumable: after each page the QIDO-RS offset reached is committed. If the archive goes away
mid-run, the next run continues the interrupted walk from one page before that offset (studies
committed already are skipped by their counts), so nothing is lost and nothing is added twice
(the index's unique SOP Instance UIDs and the per-study check guarantee it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select, update

from portal import audit
from portal.archive.after import Stored
from portal.archive.external import DicomWebArchive, ExternalNotFound, ExternalUnavailable
from portal.archive.ingest import Archive
from portal.archive.models import ExternalInstance, SyncState
from portal.archive.validate import is_valid_uid
from portal.db import utcnow
from portal.index.models import Instance, Study
from portal.index.service import IndexConflict, add_instance, header_json

log = logging.getLogger(__name__)

_STUDY_UID = "0020000D"
_RELATED_INSTANCES = "00201208"
_PATIENT_ID = "00100020"
_PARALLEL_METADATA = 4
# QIDO-RS keys a search that found nothing locally may forward to the archive: selective ones
# only, so an empty broad search never turns into a walk of the whole archive.
ON_DEMAND_KEYS = ("StudyInstanceUID", "AccessionNumber", "PatientID", "0020000D",
                  "00080050", "00100020")


@dataclass
class SyncReport:
    """What one run did."""

    studies_seen: int = 0
    studies_synced: int = 0
    instances_added: int = 0
    studies_refused: int = 0
    pages: int = 0
    resumed_from: int | None = None
    completed: bool = False

    def describe(self) -> str:
        """One line for the CLI and the log."""
        resumed = "" if self.resumed_from is None else f" (resumed at offset {self.resumed_from})"
        return (f"{self.studies_seen} studies seen, {self.studies_synced} synced, "
                f"{self.instances_added} instances added, {self.studies_refused} refused, "
                f"{self.pages} pages{resumed}")


def _value(item: Mapping[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def dataset_from_json(item: Mapping[str, Any]) -> Dataset:
    """A pydicom data set from DICOM JSON, leaving out bulk data (kept at the archive)."""
    return Dataset.from_json({tag: element for tag, element in item.items()
                              if isinstance(element, dict) and "BulkDataURI" not in element})


class _Refused(Exception):
    pass


def sync_study(archive: Archive, client: DicomWebArchive, study_uid: str) -> int:
    """Index the instances of one external study the index does not have; return how many.

    The whole study is refused (and a security alert raised) when its metadata names another
    study or more than one patient, or contradicts what the index holds.
    """
    try:
        metadata = client.study_metadata(study_uid)
    except ExternalNotFound:
        return 0
    return index_study(archive, study_uid, metadata)


def index_study(archive: Archive, study_uid: str, metadata: list[dict[str, Any]]) -> int:
    """Index one study's instances from its WADO-RS metadata (see ``sync_study``)."""
    datasets: list[Dataset] = []
    patients: set[tuple[str, str]] = set()
    for item in metadata:
        try:
            ds = dataset_from_json(item)
        except Exception:  # one undecodable header never stops the sync
            log.warning("skipped an instance header the archive sent malformed")
            continue
        uids = (str(ds.get("SOPInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                str(ds.get("SOPClassUID", "")))
        if not all(is_valid_uid(uid) for uid in uids):
            log.warning("skipped an instance header without valid UIDs")
            continue
        if str(ds.get("StudyInstanceUID", "")) != study_uid:
            _refuse(archive, study_uid, "external metadata names another study")
            return 0
        patient_id = str(ds.get("PatientID", "") or "").strip()[:64]
        issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()[:64] if patient_id else ""
        patients.add((patient_id, issuer))
        datasets.append(ds)
    if len(patients) > 1:
        _refuse(archive, study_uid, "external study names more than one patient")
        return 0
    if not datasets:
        return 0
    added: list[Stored] = []
    try:
        with archive.database.write_transaction() as session:
            known = set(session.scalars(select(Instance.sop_instance_uid).where(
                Instance.sop_instance_uid.in_([str(ds.SOPInstanceUID) for ds in datasets]))))
            for ds in datasets:
                uid = str(ds.SOPInstanceUID)
                if uid in known:
                    continue
                known.add(uid)
                syntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(
                    ds, "file_meta") else ""
                add_instance(session, ds, sop_class_uid=str(ds.SOPClassUID),
                             sop_instance_uid=uid, study_uid=study_uid,
                             series_uid=str(ds.SeriesInstanceUID),
                             transfer_syntax_uid=str(syntax or ""))
                session.execute(update(Instance).where(Instance.sop_instance_uid == uid)
                                .values(header=header_json(ds)))
                session.add(ExternalInstance(sop_instance_uid=uid, study_instance_uid=study_uid,
                                             series_instance_uid=str(ds.SeriesInstanceUID)))
                added.append(Stored("stored", str(ds.SOPClassUID), uid, study_uid,
                                    str(ds.SeriesInstanceUID)))
    except IndexConflict as exc:
        _refuse(archive, study_uid, f"external study contradicts the index: {exc}")
        return 0
    # Audited, and its SR and PDF objects made reports (fetched for that), like any ingest.
    source = archive.remote.client.source[:64] if archive.remote is not None else ""
    archive.after_ingest(added, via="sync", who="archive:sync", source_address=source)
    return len(added)


def _refuse(archive: Archive, study_uid: str, reason: str) -> None:
    log.error("sync refused a study: %s", reason)
    audit.record(archive.database, audit.SECURITY_ALERT, action="C",
                 outcome=audit.OUTCOME_SERIOUS_FAILURE, who="archive:sync",
                 source_address="", study_instance_uid=study_uid, details={"reason": reason})
    raise _Refused(reason)


def _sync_listed(archive: Archive, client: DicomWebArchive, items: list[dict[str, Any]],
                 report: SyncReport) -> None:
    """Sync the studies of one QIDO-RS page that the index lacks or has incompletely."""
    uids = [str(_value(item, _STUDY_UID) or "") for item in items]
    patients: dict[str, set[str]] = {}
    for item, uid in zip(items, uids, strict=True):
        patients.setdefault(uid, set()).add(str(_value(item, _PATIENT_ID) or ""))
    with archive.database.new_session() as session:
        local = dict(session.execute(select(Study.study_instance_uid, Study.number_of_instances)
                                     .where(Study.study_instance_uid.in_(uids))).all())
    refused: set[str] = set()
    wanted: list[str] = []
    for item, uid in zip(items, uids, strict=True):
        report.studies_seen += 1
        if not is_valid_uid(uid) or uid in refused:
            continue
        if len(patients[uid]) > 1:
            # One Study Instance UID under several patients (Orthanc lists each): never
            # index any of it.
            refused.add(uid)
            report.studies_refused += 1
            with contextlib.suppress(_Refused):
                _refuse(archive, uid, "external archive lists the study under several patients")
            continue
        remote_count = _value(item, _RELATED_INSTANCES)
        try:
            if remote_count is not None and uid in local and local[uid] >= int(remote_count):
                continue  # already complete
        except (TypeError, ValueError):
            pass
        if uid not in wanted:
            wanted.append(uid)
    # Metadata of a page's studies comes in parallel (the archive's latency dominates); the
    # index writes stay one study per transaction, in order.
    with ThreadPoolExecutor(max_workers=_PARALLEL_METADATA,
                            thread_name_prefix="sync-metadata") as pool:
        for uid, metadata in zip(wanted, pool.map(_metadata_or_none(client), wanted),
                                 strict=True):
            if metadata is None:
                continue
            try:
                added = index_study(archive, uid, metadata)
            except _Refused:
                report.studies_refused += 1
                continue
            if added:
                report.studies_synced += 1
                report.instances_added += added


def _metadata_or_none(client: DicomWebArchive) -> Callable[[str], list[dict[str, Any]] | None]:
    def fetch(uid: str) -> list[dict[str, Any]] | None:
        try:
            return client.study_metadata(uid)
        except ExternalNotFound:
            return None
    return fetch


def _state(archive: Archive, source: str) -> SyncState:
    with archive.database.write_transaction() as session:
        state = session.scalars(select(SyncState).where(SyncState.source == source)).first()
        if state is None:
            state = SyncState(source=source, run_since="", next_offset=None, studies_synced=0,
                              last_error="")
            session.add(state)
            session.flush()
        session.expunge(state)
        return state


def _save(archive: Archive, source: str, **values: Any) -> None:
    with archive.database.write_transaction() as session:
        session.execute(update(SyncState).where(SyncState.source == source).values(**values))


def sync_index(archive: Archive, client: DicomWebArchive, *, full: bool = False,
               page_size: int = 100, lookback_days: int = 7,
               progress: Callable[[SyncReport], None] | None = None) -> SyncReport:
    """One sync run (see the module docstring); raises ``ExternalUnavailable`` when the
    archive fails mid-run, after recording how far the run got."""
    report = SyncReport()
    state = _state(archive, client.source)
    if state.next_offset is not None and not full:
        since = state.run_since
        offset = max(0, state.next_offset - page_size)
        report.resumed_from = offset
    else:
        since = ""
        if not full and state.completed_at is not None:
            since = (state.completed_at.astimezone(UTC) - timedelta(days=lookback_days)
                     ).strftime("%Y%m%d")
        offset = 0
        _save(archive, client.source, run_since=since, next_offset=0,
              run_started_at=utcnow())
    filters = {"StudyDate": f"{since}-"} if since else {}
    started = datetime.now(UTC)
    try:
        while True:
            page = client.search_studies(filters, limit=page_size, offset=offset)
            report.pages += 1
            _sync_listed(archive, client, page, report)
            offset += len(page)
            _save(archive, client.source, next_offset=offset)
            if progress is not None:
                progress(report)
            if len(page) < page_size:
                break
    except ExternalUnavailable as exc:
        _save(archive, client.source, last_error=str(exc)[:256],
              studies_synced=state.studies_synced + report.studies_synced)
        raise
    with archive.database.new_session() as session:
        run_started = session.scalars(select(SyncState.run_started_at).where(
            SyncState.source == client.source)).first()
    _save(archive, client.source, next_offset=None, completed_at=run_started or started,
          last_error="", studies_synced=state.studies_synced + report.studies_synced)
    report.completed = True
    log.info("archive sync: %s", report.describe())
    return report


def sync_matching(archive: Archive, client: DicomWebArchive,
                  query: Mapping[str, list[str]], limit: int = 50) -> int:
    """On demand: ask the archive for studies matching the selective keys of a local search
    that found nothing, and index them; return how many studies were added."""
    filters = {key: values[0] for key, values in query.items()
               if key in ON_DEMAND_KEYS and values and values[0]}
    if not filters:
        return 0
    report = SyncReport()
    _sync_listed(archive, client, client.search_studies(filters, limit=limit), report)
    return report.studies_synced


def sync_on_miss(archive: Archive, query: Mapping[str, list[str]]) -> int:
    """A local study search found nothing: ask the external archive (if any) with the
    search's selective keys and index what it has. Never fails the search: an unreachable
    archive just leaves the answer empty (and is logged)."""
    if archive.remote is None:
        return 0
    try:
        return sync_matching(archive, archive.remote.client, query)
    except ExternalUnavailable as exc:
        log.warning("search miss not forwarded to the external archive: %s", exc)
        return 0


def sync_now(full: bool = False) -> str:
    """The periodic job ``archive-sync`` (portal/jobs.py: run once per cluster at a time):
    one run against the configured external archive (ExternalUnavailable: tried again)."""
    from flask import current_app

    from portal.archive import current_archive

    archive = current_archive()
    if archive.remote is None:
        return "no external archive is configured"
    settings = current_app.config["PORTAL"]
    report = sync_index(archive, archive.remote.client, full=full,
                        page_size=settings["ARCHIVE_SYNC_PAGE_SIZE"],
                        lookback_days=settings["ARCHIVE_SYNC_LOOKBACK_DAYS"])
    log.info("archive sync: %s", report.describe())
    return report.describe()
